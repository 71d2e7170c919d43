"""Shared pytest fixtures (stable names; other test files rely on them).

- ``chatml_tokenizer`` (session): byte-level BPE tokenizer trained locally on
  ``trajinf.models.tiny.DEFAULT_CORPUS`` with ``CHATML_TOOL_TEMPLATE`` (eos/end-of-turn ``<|im_end|>``,
  pad ``<|endoftext|>``). Do not mutate it.
- ``llama3_tokenizer`` (session): the same with ``LLAMA3_TOOL_TEMPLATE`` (eos ``<|eot_id|>``).
- ``tool_pool_records`` (function): a fresh list of 6 OpenAI-format trajectory dicts with
  ``tools``, assistant ``tool_calls`` + ``tool`` results and plain-text actions; task_ids
  ``cook-0001``, ``cook-0002``, ``find-0001``, ``find-0002`` (two records each for cook-0001 and
  find-0001), ``meta["family"]`` in {cook, find}, ``success`` True/False, ``source`` expert/noisy,
  and an unknown top-level field ``annotator`` on one record. Safe to mutate.
- ``write_jsonl(directory, records, name="pool.jsonl") -> Path``: writes records as JSONL.
- ``make_tiny_job`` (session): ``make_tiny_job(dir, n_tasks=10) -> dir`` writes pool.jsonl,
  target.jsonl (ToolWorld rollouts) and an untrained tiny model/ with its tokenizer.
- ``load_benchmark`` (session): ``load_benchmark("lds") -> module`` imports ``benchmarks/lds.py``
  by path (benchmarks is no package), once per session.
- ``TOOLS``: the OpenAI tool schemas used by ``tool_pool_records`` (module constant).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from trajinf.data.chat_templates import CHATML_TOOL_TEMPLATE, LLAMA3_TOOL_TEMPLATE
from trajinf.models.tiny import DEFAULT_CORPUS, train_tokenizer

# Tiny models are dominated by per-op overhead: one thread is as fast as two on an idle machine
# and up to 10x faster on a loaded one (measured); it also keeps float reductions in one order.
torch.set_num_threads(1)


def _tool(name: str, **props: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} something",
            "parameters": {
                "type": "object",
                "properties": {k: {"type": v} for k, v in props.items()},
                "required": list(props),
            },
        },
    }


TOOLS = [
    _tool("open", target="string"),
    _tool("take", item="string"),
    _tool("go", direction="string"),
]
SYSTEM = "You are an agent in a text world. Use the tools to reach the goal."


def _call(cid: str, name: str, **args: str) -> dict:
    fn = {"name": name, "arguments": json.dumps(args)}
    return {"id": cid, "type": "function", "function": fn}


def _record(rid, task, family, success, source, goal, actions, **extra) -> dict:
    """actions: list of (tool name, args) for a tool call or a str for a plain-text action."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": goal}]
    for k, act in enumerate(actions):
        if isinstance(act, str):
            msgs.append({"role": "assistant", "content": act})
            msgs.append({"role": "user", "content": f"You did: {act}."})
        else:
            cid = f"{rid}-c{k}"
            msgs.append(
                {"role": "assistant", "content": "", "tool_calls": [_call(cid, act[0], **act[1])]}
            )
            msgs.append({"role": "tool", "tool_call_id": cid, "content": f"{act[0]} ok."})
    return {
        "id": rid,
        "task_id": task,
        "source": source,
        "success": success,
        "reward": 1.0 if success else 0.0,
        "tools": TOOLS,
        "messages": msgs,
        "meta": {"family": family},
        **extra,
    }


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return train_tokenizer(DEFAULT_CORPUS, vocab_size=512, template=CHATML_TOOL_TEMPLATE)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return train_tokenizer(DEFAULT_CORPUS, vocab_size=512, template=LLAMA3_TOOL_TEMPLATE)


@pytest.fixture
def tool_pool_records() -> list[dict]:
    cook = "Goal: put a clean apple in the fridge. You are in the kitchen."
    find = "Goal: find the key. You are in the hallway."
    return [
        _record("t-0001", "cook-0001", "cook", True, "expert", cook,
                [("take", {"item": "apple"}), "wash apple", ("open", {"target": "fridge"}), "put apple in fridge"],
                annotator="alice"),
        _record("t-0002", "cook-0001", "cook", False, "noisy", cook,
                [("go", {"direction": "north"}), "look around", ("take", {"item": "apple"})]),
        _record("t-0003", "cook-0002", "cook", True, "expert", cook,
                [("open", {"target": "fridge"}), ("take", {"item": "apple"}), "put apple in fridge"]),
        _record("t-0004", "find-0001", "find", True, "expert", find,
                ["look around", ("take", {"item": "key"})]),
        _record("t-0005", "find-0001", "find", False, "noisy", find,
                [("go", {"direction": "south"}), ("go", {"direction": "north"}), "inventory"]),
        _record("t-0006", "find-0002", "find", True, "expert", find,
                [("go", {"direction": "east"}), "take key"]),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def load_benchmark():
    def load(name: str):
        key = f"trajinf_bench_{name}"
        if key not in sys.modules:
            path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(key, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[key] = mod  # dataclasses resolve their module through sys.modules
            spec.loader.exec_module(mod)
        return sys.modules[key]

    return load


@pytest.fixture
def write_jsonl():
    def write(directory: Path, records: list, name: str = "pool.jsonl") -> Path:
        path = Path(directory) / name
        with path.open("w", encoding="utf-8") as f:
            for r in records:
                f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
        return path

    return write


def _tiny_job(d: Path, n_tasks: int = 10) -> Path:
    """pool.jsonl (2 * n_tasks ToolWorld trajectories), target.jsonl (3) and an untrained model/."""
    from trajinf.data.write import write_pool
    from trajinf.envs import make_env
    from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy
    from trajinf.envs.rollout import rollout
    from trajinf.models.tiny import tiny_model, tokenizer_corpus

    env = make_env("builtin")
    tasks = env.tasks("train", n_tasks, 0)
    pool = rollout(env, tasks, ExpertPolicy(), source="expert", with_tools=False) + rollout(
        env, tasks, NoisyExpertPolicy(0.5), source="noisy", with_tools=False
    )
    target = rollout(env, env.tasks("test", 3, 1), ExpertPolicy(), source="t", with_tools=False)
    write_pool(pool, d / "pool.jsonl")
    write_pool(target, d / "target.jsonl")
    tok = train_tokenizer(tokenizer_corpus(pool + target), vocab_size=300)
    model = tiny_model(tok, hidden=32, layers=1, heads=2, seed=0)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d


@pytest.fixture(scope="session")
def make_tiny_job():
    """``make_tiny_job(dir, n_tasks=10) -> dir``: a small pool, target and tiny model on disk."""
    return _tiny_job
