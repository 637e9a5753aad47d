"""Run under torchrun by tests/test_multinode.py (or alone for the TP 1 reference): greedy generation on a tiny
checkpoint with logprobs; rank 0 writes tokens and logprobs as JSON. Followers never return from LLM()."""

import json
import sys

from glm45v_npu import LLM, SamplingParams
from tests.tiny import IMAGE_TOKEN, random_image


def main() -> None:
    ckpt, out, tp, ep = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "ep"
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004, tensor_parallel_size=tp, enable_expert_parallel=ep,
              dist_timeout_s=60)
    requests = [{"prompt_token_ids": [5, 6, 7, 8, 9]},
                {"prompt_token_ids": [11, IMAGE_TOKEN, 12, 13], "images": [random_image(60, 40, 1)]}]
    outs = llm.generate(requests, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0))
    result = [{"tokens": o.outputs[0].token_ids,
               "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
              for o in outs]
    with open(out, "w") as f:
        json.dump(result, f)
    llm.close()


if __name__ == "__main__":
    main()
