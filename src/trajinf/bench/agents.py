"""An agent that sometimes succeeds on its own: the starting point of the flood.

A tiny chat model (``models/tiny``) trained longer on expert demos of the *other* task families
of an environment, plus a handful of demos of the target families, so that on held-out target
tasks it succeeds part of the time (the flood needs mixed outcomes: groups of sampled rollouts
where some succeed and some fail). Building it takes minutes on a CPU, so it is cached on disk
under ``~/.cache/trajinf/agents/<fingerprint>/`` (``$TRAJINF_CACHE`` overrides the root): the
fingerprint is a hash of the :class:`AgentConfig` and the recipe version, the directory is
written under a temporary name and renamed into place when complete (a killed build leaves no
half agent), and ``agent.json`` in it records the config and the agent's measured held-out
success per family.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trajinf.errors import TrajinfError

RECIPE_VERSION = 1  # bump when the build changes what an AgentConfig produces
# the ToolWorld families a tiny agent half-learns (cook and sort stay near 0 at this size): the
# target families of the ToolWorld flood and harm benchmarks
BUILTIN_TARGETS = ("repair", "unlock")


@dataclass(frozen=True)
class AgentConfig:
    """What the agent is built from (its fingerprint)."""

    env: str = "builtin"
    target_families: tuple[str, ...] = ()  # () = the first half of the env's families
    n_other_tasks: int = 48  # expert demos of the other families (the long pretraining)
    n_target_demos: int = 4  # expert demos per target family (a little of the wanted skill)
    epochs: int = 12
    lr: float = 1e-2
    seed: int = 0
    n_eval_tasks: int = 40  # held-out target tasks its success is measured on
    model: dict = field(default_factory=dict)  # overrides of trajinf.train.sft.DEMO_MODEL

    def fingerprint(self) -> str:
        blob = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root() -> Path:
    """``$TRAJINF_CACHE/agents`` (default ``~/.cache/trajinf/agents``)."""
    root = os.environ.get("TRAJINF_CACHE") or str(Path.home() / ".cache" / "trajinf")
    return Path(root) / "agents"


def target_families_of(env, config: AgentConfig) -> list[str]:
    families = list(getattr(env, "families", None) or env.games)
    fams = list(config.target_families or families[: max(1, len(families) // 2)])
    bad = [f for f in fams if f not in families]
    if bad:
        raise TrajinfError(f"AgentConfig field 'target_families': {bad} not in {families}")
    return fams


def agent_tasks(env, config: AgentConfig) -> tuple[list, list]:
    """(other-family tasks, target-family tasks) the agent's demos come from: drawn from the
    env's train split with a seed of their own, so benchmark task draws (other seeds) rarely
    meet them; the flood and the evaluation use their own draws."""
    fams = set(target_families_of(env, config))
    families = list(getattr(env, "families", None) or env.games)
    n_fam = max(1, len(families))
    n = (config.n_other_tasks + config.n_target_demos * len(fams)) * n_fam
    tasks = env.tasks("train", n, 7919 + config.seed)
    other = [t for t in tasks if t.family not in fams][: config.n_other_tasks]
    target: list = []
    for f in sorted(fams):
        target += [t for t in tasks if t.family == f][: config.n_target_demos]
    return other, target


def agent_demos(env, config: AgentConfig, *, source: str = "expert") -> list:
    """The expert demos the agent is trained on (other families first, then the targets')."""
    from trajinf.envs.policies import ExpertPolicy
    from trajinf.envs.rollout import rollout

    other, target = agent_tasks(env, config)
    return rollout(env, other + target, ExpertPolicy(), source=source, with_tools=False)


def build_agent(config: AgentConfig, out: Path, *, log=print) -> dict:
    """Train the agent into ``out`` (model + tokenizer) and return its info dict."""
    import torch

    from trajinf.envs import make_env
    from trajinf.envs.evaluate import evaluate_policy
    from trajinf.envs.model_policy import ModelPolicy
    from trajinf.envs.policies import ExpertPolicy
    from trajinf.envs.rollout import rollout
    from trajinf.models.tiny import tiny_model, tokenizer_corpus, train_tokenizer
    from trajinf.train.sft import DEMO_MODEL, DEMO_TRAIN, train_sft

    t0 = time.perf_counter()
    env = make_env(config.env)
    fams = target_families_of(env, config)
    other, target = agent_tasks(env, config)
    demos = agent_demos(env, config)
    # the tokenizer also sees expert text of every family's tasks (not trained on): words of
    # the target families' later rollouts must not fall apart into characters
    vocab_tasks = env.tasks("train", 64, 104729 + config.seed)
    vocab = rollout(env, vocab_tasks, ExpertPolicy(), source="vocab", with_tools=False)
    tok = train_tokenizer(tokenizer_corpus(demos + vocab), vocab_size=DEMO_MODEL["vocab_size"])
    kw = {k: v for k, v in {**DEMO_MODEL, **config.model}.items() if k != "vocab_size"}
    torch.manual_seed(config.seed)
    model = tiny_model(tok, seed=config.seed, **kw)
    log(
        f"agent: {len(other)} demos of other families, {len(target)} of {fams}, "
        f"{config.epochs} epochs"
    )
    train_sft(
        model, tok, demos, replace(DEMO_TRAIN, epochs=config.epochs, lr=config.lr, seed=config.seed)
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    policy = ModelPolicy(model, tok, mode="rank", temperature=0.0)
    ev = evaluate_policy(
        env,
        policy,
        split="test",
        n_tasks=config.n_eval_tasks,
        seed=config.seed,
        families=fams,
        with_tools=False,
    ).to_dict()
    info = {
        "config": asdict(config),
        "fingerprint": config.fingerprint(),
        "target_families": fams,
        "target_success": ev["success_rate"],
        "per_family": ev["per_family"],
        "n_demos": len(demos),
        "build_seconds": time.perf_counter() - t0,
    }
    text = json.dumps(info, indent=2, default=str)
    (out / "agent.json").write_text(text)
    return json.loads(text)  # what a later cache hit reads back


def cached_agent(config: AgentConfig, *, log=print, root: Path | None = None) -> tuple[Path, dict]:
    """The agent's directory and info, built on first use and reused after that.

    The build happens in ``<fingerprint>.tmp-<pid>`` and is renamed to ``<fingerprint>`` only
    when complete, so concurrent or killed builds never leave a partial agent behind."""
    root = Path(root) if root is not None else cache_root()
    final = root / config.fingerprint()
    if (final / "agent.json").exists():
        return final, json.loads((final / "agent.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    _remove_orphans(root, final.name)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = build_agent(config, tmp, log=log)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same agent first: keep theirs
            if not (final / "agent.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            info = json.loads((final / "agent.json").read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"agent {final.name}: held-out target success {info['target_success']:.3f} "
        f"(built in {info['build_seconds']:.0f} s, cached)"
    )
    return final, info


def _remove_orphans(root: Path, name: str) -> None:
    """Delete ``<name>.tmp-<pid>`` builds whose process is gone (a SIGKILL skips the cleanup)."""
    for d in root.glob(f"{name}.tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue
