"""Runs many `glm45v` command lines in one interpreter: torch is imported once, then each command line runs in a
forked child with its own stdout/stderr files and exit status, as a separate `glm45v` process would (an exception
that escapes prints its traceback, as the interpreter would). For the one-line-error checks, which would
otherwise pay two seconds of imports per case."""

import json
import os
import sys
import traceback


def _child(argv: list[str], out: str, err: str) -> None:
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    sys.argv = ["glm45v", *argv]
    code = 0
    try:
        from glm45v_npu.cli import main

        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    cases, folder = json.loads(sys.argv[1]), sys.argv[2]
    import torch  # noqa: F401  (once, for every child)

    import glm45v_npu.cli  # noqa: F401

    results = []
    for i, argv in enumerate(cases):
        out, err = os.path.join(folder, f"{i}.out"), os.path.join(folder, f"{i}.err")
        pid = os.fork()
        if pid == 0:
            _child(argv, out, err)
        _, status = os.waitpid(pid, 0)
        results.append({"returncode": os.waitstatus_to_exitcode(status), "stdout": open(out).read(),
                        "stderr": open(err).read()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
