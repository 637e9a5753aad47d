"""Runs many `glm45v` command lines in one interpreter: torch and the commands' modules are imported once,
then each command line runs in a forked child with its own stdout/stderr files and exit status, as a separate
`glm45v` process would (an exception that escapes prints its traceback, as the interpreter would). For the
one-line-error checks and the command runs, which would otherwise pay seconds of imports per case."""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path


def _child(argv: list[str], stdin: str, out: str, err: str) -> None:
    os.dup2(os.open(stdin, os.O_RDONLY), 0)
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
    import importlib

    # once, for every child: torch, and what the commands load when they run (the model's code, transformers'
    # tokenizer and image processor), which would otherwise cost each child seconds
    for name in ("torch", "glm45v_npu.cli", "glm45v_npu.llm", "glm45v_npu.apps.chat", "glm45v_npu.apps.caption",
                 "glm45v_npu.apps.bench", "glm45v_npu.apps.info", "transformers.models.auto.tokenization_auto",
                 "transformers.models.auto.image_processing_auto"):
        importlib.import_module(name)

    results = []
    for i, case in enumerate(cases):
        out, err = os.path.join(folder, f"{i}.out"), os.path.join(folder, f"{i}.err")
        pid = os.fork()
        if pid == 0:
            _child(case["argv"], case["stdin"], out, err)
        _, status = os.waitpid(pid, 0)
        results.append({"returncode": os.waitstatus_to_exitcode(status), "stdout": open(out).read(),
                        "stderr": open(err).read()})
    print(json.dumps(results))


def cli_env(cache: Path) -> dict:
    """The environment a test's `glm45v` runs get: a fresh model cache, the session's native CPU kernels (built once,
    not again per run)."""
    from glm45v_npu.kernels.cpu import cache_folder

    return dict(os.environ, GLM45V_CACHE=str(cache), PYTHONUNBUFFERED="1", GLM45V_KERNEL_CACHE=str(cache_folder()))


def forked(env: dict, folder: Path, cases: list) -> list[subprocess.CompletedProcess]:
    """Each command line (a list, or a pair: the list and what it reads on stdin) as its own process, forked after
    one import of torch and the commands' modules (this module run as the driver): the same exit status, stdout and
    stderr as a separate `glm45v` run, without seconds of imports per case."""
    folder.mkdir(exist_ok=True)
    jobs = []
    for i, case in enumerate(cases):
        argv, stdin = case if isinstance(case, tuple) else (case, None)
        if stdin is not None:
            (folder / f"{i}.in").write_text(stdin)
        jobs.append({"argv": list(map(str, argv)), "stdin": str(folder / f"{i}.in") if stdin is not None else os.devnull})
    driver = subprocess.run([sys.executable, "-m", "tests.cli_cases", json.dumps(jobs), str(folder)], env=env,
                            capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert driver.returncode == 0, driver.stderr
    results = json.loads(driver.stdout)
    assert len(results) == len(cases)
    return [subprocess.CompletedProcess(c, r["returncode"], r["stdout"], r["stderr"]) for c, r in zip(cases, results)]

if __name__ == "__main__":
    main()
