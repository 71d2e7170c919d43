"""benchmarks/harm_incontext.py: the per-step log-probabilities it reads are the model's own
log-probabilities of each action's tokens (without the line's newline), after the prefix,
with or without the prefix's cache."""

import json

import numpy as np
import torch

from trajinf.data.schema import Trajectory
from trajinf.models.tiny import tiny_model


def test_step_logprobs_match_a_direct_read(load_benchmark, chatml_tokenizer):
    mod = load_benchmark("harm_incontext")
    tok = chatml_tokenizer
    model = tiny_model(tok).eval()
    call = {"function": {"name": "inspect", "arguments": json.dumps({"target": "lamp"})}}
    traj = Trajectory(
        id="t0",
        messages=[
            {"role": "system", "content": "Act."},
            {"role": "user", "content": "Goal: repair the lamp."},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c0", **call}]},
            {"role": "tool", "tool_call_id": "c0", "content": "The lamp sparks."},
        ],
    )
    lines = mod.render(traj)
    assert lines == [("Goal: repair the lamp.", False), ("> inspect lamp", True),
                     ("The lamp sparks.", False)]  # fmt: skip
    prefix = tok("Examples:\n", add_special_tokens=False)["input_ids"]
    (got,) = mod.step_logprobs(model, tok, lines, prefix)
    cache = mod.prefix_cache(model, prefix)
    (cached,) = mod.step_logprobs(model, tok, lines, prefix, cache)
    (again,) = mod.step_logprobs(model, tok, lines, prefix, cache)  # the cache is restored
    before = prefix + tok("Goal: repair the lamp.\n", add_special_tokens=False)["input_ids"]
    action = tok("> inspect lamp\n", add_special_tokens=False)["input_ids"][:-1]
    ids = torch.tensor([before + action])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0], -1)
    want = [lp[len(before) + j - 1, a].item() for j, a in enumerate(action)]
    for read in (got, cached, again):
        np.testing.assert_allclose(read, want, rtol=1e-4, atol=1e-5)
