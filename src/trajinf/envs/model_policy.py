"""A language model as an agent policy: rank the valid actions by likelihood, or generate one.

Implements the rollout ``Policy`` protocol: ``act(episodes) -> list[str]``, one action per episode.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trajinf.data.template_check import check_chat_template
from trajinf.errors import TemplateError, TrajinfError
from trajinf.train.sft import base_forward, pad_id, supports_logits_to_keep, token_logprobs

# End-of-turn markers of the chat templates trajinf ships (ChatML, Llama 3); generation stops there.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")
_CANDIDATE_CHUNK = 16  # candidates scored together from one episode's cache (memory bound)
_CACHE_NOTE = "model_policy_kv"  # EpisodeState.notes key of an episode's prompt KV cache
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def window_messages(messages: list[dict], history_window: int | None) -> list[dict]:
    """System + first user message + the last ``history_window`` steps (all when None).

    A step is an assistant message and the tool/user messages after it, so the newest observation
    is always kept.
    """
    if history_window is None:
        return list(messages)
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    if first_user is None:
        return list(messages)
    head, rest = messages[: first_user + 1], messages[first_user + 1 :]
    starts = [i for i, m in enumerate(rest) if m.get("role") == "assistant"]
    if len(starts) <= history_window:
        return list(messages)
    keep_from = starts[len(starts) - history_window] if history_window > 0 else len(rest)
    return list(head) + list(rest[keep_from:])


def parse_reply(text: str) -> dict:
    """Assistant message from generated text: ChatML ``<tool_call>{json}</tool_call>`` blocks,
    a bare ``{"name": ..., "arguments"|"parameters": ...}`` JSON object (Llama 3 style), or
    plain content."""
    calls: list[dict] = []
    for k, body in enumerate(_TOOL_CALL_RE.findall(text)):
        call = _json_call(body)
        if call is not None:
            calls.append(_tool_call(k, *call))
    if calls:
        return {
            "role": "assistant",
            "content": _TOOL_CALL_RE.sub("", text).strip(),
            "tool_calls": calls,
        }
    call = _json_call(text.strip())
    if call is not None:
        return {"role": "assistant", "content": "", "tool_calls": [_tool_call(0, *call)]}
    return {"role": "assistant", "content": text.strip()}


def _json_call(body: str) -> tuple[str, Any] | None:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args


def _tool_call(k: int, name: str, args: Any) -> dict:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {
        "id": f"call_{k}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class ModelPolicy:
    """Policy backed by a causal LM and its chat template.

    mode="rank": score each valid action by ``sum log p(action tokens | chat history)`` of the
    assistant message it would produce (``env.action_to_message``), rendered with the tokenizer's
    chat template and tools; pick the argmax (temperature 0) or sample from
    ``softmax(scores / temperature)`` with a generator seeded by ``seed``. Episodes without valid
    actions fall back to generation. mode="generate": ``model.generate`` on the chat prompt, parsed
    back with ``env.message_to_action``. ``share_prefix`` (default) runs each episode's history once
    and scores its candidates from the KV cache; otherwise all (episode, candidate) sequences of one
    ``act`` call are scored in right-padded batches of at most ``batch_size`` sequences.
    ``batch_size`` also bounds the episodes whose histories run together. ``reuse_cache`` keeps
    each episode's prompt KV cache in ``episode.notes`` from one step to the next, so a step runs
    only the tokens added since the last one (the action taken and its result) and the
    candidates; worth it for real models, whose prompts cost far more than the per-episode
    forwards it trades them for. The chat template is checked on the first ``act`` (a template
    that drops the env's tool calls raises TemplateError). The model is put in eval mode.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        mode: str = "rank",
        history_window: int | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int = 64,
        share_prefix: bool = True,
        reuse_cache: bool = False,
    ) -> None:
        if mode not in ("rank", "generate"):
            raise TrajinfError(
                f"ModelPolicy field 'mode': expected 'rank' or 'generate', got {mode!r}"
            )
        if temperature < 0:
            raise TrajinfError(f"ModelPolicy field 'temperature': must be >= 0, got {temperature}")
        self.model, self.tokenizer = model, tokenizer
        self.mode, self.history_window = mode, history_window
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.batch_size = batch_size
        # the KV-cache path needs a model that computes logits only at kept positions
        self.share_prefix = share_prefix and supports_logits_to_keep(model)
        self.reuse_cache = reuse_cache and self.share_prefix
        self._template_checked = False
        # transformers 5 renamed the KV-cache argument and output from past_key_values to cache
        params = inspect.signature(base_forward(model)).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.rng = torch.Generator().manual_seed(seed)  # the policy's own stream: no global state
        self.device = next(model.parameters()).device
        self.pad_id = pad_id(tokenizer)
        vocab = tokenizer.get_vocab()
        self.stop_ids = sorted({vocab[t] for t in END_OF_TURN_TOKENS if t in vocab})
        if tokenizer.eos_token_id is not None:
            self.stop_ids = sorted(set(self.stop_ids) | {tokenizer.eos_token_id})
        model.eval()

    # -- Policy protocol -------------------------------------------------------------------------
    @torch.inference_mode()
    def act(self, episodes: Sequence) -> list[str]:
        """One action per episode (``EpisodeState``: env, messages, tools, valid_actions, ...)."""
        if not self._template_checked and episodes:
            self.check_template(episodes[0])
        actions: list[str | None] = [None] * len(episodes)
        ranked = [i for i, ep in enumerate(episodes) if self.mode == "rank" and ep.valid_actions]
        if ranked:
            scores = self.score_actions([episodes[i] for i in ranked])
            for i, s in zip(ranked, scores, strict=True):
                actions[i] = episodes[i].valid_actions[self._choose(s)]
        for i, ep in enumerate(episodes):
            if actions[i] is None:
                actions[i] = self.generate_action(ep)
        return actions  # type: ignore[return-value]

    def check_template(self, episode) -> None:
        """Refuse a chat template that drops what this env's actions are (tool calls and their
        results, or plain text): the policy would score empty actions."""
        if episode.valid_actions:
            calls = bool(episode.env.action_to_message(episode.valid_actions[0]).get("tool_calls"))
        else:  # no action to look at: the tool schema or the history tells
            calls = bool(episode.tools) or any(m.get("tool_calls") for m in episode.messages)
        check_chat_template(
            self.tokenizer, tool_calls=calls, tool_results=calls, where="model policy"
        )
        self._template_checked = True

    # -- rank mode -------------------------------------------------------------------------------
    def prompt_text(self, episode) -> str:
        """The chat prompt for the next assistant turn (history windowed, generation prompt added)."""
        return self.tokenizer.apply_chat_template(
            window_messages(episode.messages, self.history_window),
            tools=episode.tools,
            add_generation_prompt=True,
            tokenize=False,
        )

    def candidate_sequence(self, episode, action: str, prompt: str) -> tuple[list[int], list[bool]]:
        """Token ids of history + the candidate's assistant message, and its action-token mask.

        Action tokens are those of the assistant message after the generation prompt ``prompt``,
        end-of-turn token included, exactly as ``tokenize.py`` marks them for training.
        """
        history = window_messages(episode.messages, self.history_window)
        text = self.tokenizer.apply_chat_template(
            history + [episode.env.action_to_message(action)], tools=episode.tools, tokenize=False
        )
        if not text.startswith(prompt):
            raise TemplateError(
                "chat template: history + assistant message does not extend the generation prompt"
            )
        # same span rule as tokenize.py: up to and including the end-of-turn token, not the
        # whitespace after it; a token belongs to the span holding its first character
        end = len(prompt) + len(text[len(prompt) :].rstrip())
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.maximum.accumulate([s for s, _ in enc["offset_mapping"]] or [0])
        mask = [len(prompt) <= int(s) < end for s in starts[: len(enc["input_ids"])]]
        return list(enc["input_ids"]), mask

    @torch.inference_mode()
    def score_actions(self, episodes: Sequence) -> list[np.ndarray]:
        """Per episode, float64 [n_valid_actions]: summed log-prob of each candidate's tokens.

        With ``share_prefix`` each episode's history runs once (histories of ``batch_size``
        episodes batched) and its KV cache is reused by every candidate: the history is most of
        the tokens. Candidates whose tokens do not extend the prompt's tokens (a BPE merge across
        the boundary) are scored in full.
        """
        out = [np.zeros(len(ep.valid_actions)) for ep in episodes]
        full: list[tuple[int, int, list[int], list[bool]]] = []
        groups: list[tuple[int, list[int], list[tuple[int, list[int], list[bool]]]]] = []
        for e, ep in enumerate(episodes):
            prompt = self.prompt_text(ep)
            seqs = [self.candidate_sequence(ep, a, prompt) for a in ep.valid_actions]
            if not self.share_prefix:
                full += [(e, c, ids, mask) for c, (ids, mask) in enumerate(seqs)]
                continue
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            n = len(prompt_ids)
            cands = []
            for c, (ids, mask) in enumerate(seqs):
                if len(ids) > n and ids[:n] == prompt_ids and not any(mask[:n]):
                    cands.append((c, ids[n:], mask[n:]))
                else:
                    full.append((e, c, ids, mask))
            if cands and self.reuse_cache:
                self._score_from_episode_cache(ep, e, prompt_ids, cands, out)
            elif cands:
                groups.append((e, prompt_ids, cands))
        for start in range(0, len(groups), self.batch_size):
            self._score_from_prefix(groups[start : start + self.batch_size], out)
        # sorting by length keeps padding small; scores do not depend on batch composition
        full.sort(key=lambda s: len(s[2]))
        for start in range(0, len(full), self.batch_size):
            chunk = full[start : start + self.batch_size]
            ids, attn, score_mask = _right_pad([(s[2], s[3]) for s in chunk], self.pad_id)
            logp = token_logprobs(
                self.model, ids.to(self.device), attn.to(self.device), score_mask.to(self.device)
            )
            totals = logp.sum(dim=1).double().cpu().numpy()
            for b, (e, c, _, _) in enumerate(chunk):
                out[e][c] = totals[b]
        return out

    def _score_from_episode_cache(
        self, episode, e: int, prompt_ids: list[int], cands: list, out: list[np.ndarray]
    ) -> None:
        """Score one episode's candidate suffixes from its prompt KV cache, kept in
        ``episode.notes`` across steps: only the prompt tokens past the longest common prefix
        with the cached ones run (the cache is cropped to that prefix first)."""
        dev = self.device
        cached_ids, cache = episode.notes.get(_CACHE_NOTE, ([], None))
        keep = 0
        for a, b in zip(cached_ids, prompt_ids[:-1], strict=False):  # >= 1 token must run
            if a != b:
                break
            keep += 1
        if cache is not None and keep > 0:
            drop = cache.get_seq_length() - keep
            if drop > 0:
                cache.crop(-drop)  # negative: remove that many (transformers 4 and 5 agree)
        else:
            cache, keep = None, 0
        new = torch.tensor([prompt_ids[keep:]], dtype=torch.long, device=dev)
        kw = {self._cache_kw: cache} if cache is not None else {}
        pre = self.model(
            input_ids=new,
            position_ids=torch.arange(keep, len(prompt_ids), device=dev)[None],
            use_cache=True,
            logits_to_keep=1,
            **kw,
        )
        cache = pre[self._cache_kw]
        episode.notes[_CACHE_NOTE] = (list(prompt_ids), cache)
        first = torch.log_softmax(pre.logits[:, -1].float(), dim=-1)  # [1, V]
        p_attn = torch.ones((1, len(prompt_ids)), dtype=torch.long, device=dev)
        # the candidates extend a copy (the episode's cache must stay the prompt's), in chunks:
        # each candidate holds its own copy of the history's keys and values
        for start in range(0, len(cands), _CANDIDATE_CHUNK):
            chunk = [(e, prompt_ids, cands[start : start + _CANDIDATE_CHUNK])]
            self._score_suffixes(chunk, copy.deepcopy(cache), first, p_attn, out)

    def _score_from_prefix(self, groups: list, out: list[np.ndarray]) -> None:
        """Score the candidate suffixes of ``groups`` [(episode, prompt ids, [(c, ids, mask)])]
        from one batched forward of the prompts (right-padded, KV cache kept) into ``out``."""
        dev = self.device
        p_ids, p_attn, _ = _right_pad([(g[1], [False] * len(g[1])) for g in groups], self.pad_id)
        p_ids, p_attn = p_ids.to(dev), p_attn.to(dev)
        lens = p_attn.sum(dim=1)
        pre = self.model(
            input_ids=p_ids,
            attention_mask=p_attn,
            use_cache=True,
            logits_to_keep=(lens - 1)[:, None],
        )
        first = torch.log_softmax(pre.logits[:, 0].float(), dim=-1)  # [E, V]: suffix token 0
        self._score_suffixes(groups, pre[self._cache_kw], first, p_attn, out)

    def _score_suffixes(
        self, groups: list, cache, first: torch.Tensor, p_attn: torch.Tensor, out: list
    ) -> None:
        """Candidate suffix scores into ``out`` from the prompts' KV ``cache`` (one row per
        group, modified), ``first`` float32 [E, V] (log-probs of each suffix's first token) and
        the prompts' attention int64 [E, P]."""
        dev = self.device
        lens = p_attn.sum(dim=1)
        owner = torch.tensor([g for g, grp in enumerate(groups) for _ in grp[2]], device=dev)
        cache.batch_select_indices(owner)  # one copy of its episode's history per candidate
        ids, attn, score_mask = _right_pad(
            [(c[1], c[2]) for grp in groups for c in grp[2]], self.pad_id
        )
        ids, attn, score_mask = ids.to(dev), attn.to(dev), score_mask.to(dev)
        totals = torch.where(score_mask[:, 0], first[owner, ids[:, 0]], 0.0).double()
        keep = torch.zeros_like(score_mask)
        keep[:, :-1] = score_mask[:, 1:]  # logits at j predict suffix token j + 1
        if bool(keep.any()):
            # prompt padding sits between prompt and suffix: mask it out, give true positions
            positions = lens[owner][:, None] + torch.arange(ids.shape[1], device=dev)[None]
            logits = self.model(
                input_ids=ids,
                attention_mask=torch.cat([p_attn[owner], attn], dim=1),
                position_ids=positions,
                logits_to_keep=keep,
                **{self._cache_kw: cache},
            ).logits
            logp = torch.zeros(score_mask.shape, dtype=torch.float32, device=dev)
            logp[:, 1:][score_mask[:, 1:]] = -F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                ids[:, 1:][score_mask[:, 1:]],
                reduction="none",
            )
            totals = totals + logp.sum(dim=1).double()
        totals_np = totals.cpu().numpy()
        k = 0
        for e, _, cands in groups:
            for c, _, _ in cands:
                out[e][c] = totals_np[k]
                k += 1

    def _choose(self, scores: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(scores))  # first of ties: deterministic
        probs = torch.softmax(torch.as_tensor(scores) / self.temperature, dim=0)
        return int(torch.multinomial(probs, 1, generator=self.rng))

    # -- generate mode ---------------------------------------------------------------------------
    def generate_action(self, episode) -> str:
        """Generate the assistant reply for one episode and map it to an env action."""
        reply = self.generate_text(self.prompt_text(episode))
        message = parse_reply(reply)
        try:
            return episode.env.message_to_action(message)
        except (TrajinfError, ValueError, KeyError, TypeError):
            # an unparseable reply is still an action: the env answers it as invalid
            return message.get("content") or reply.strip()

    def generate_text(self, prompt: str) -> str:
        """Greedy or seeded-sampled continuation of ``prompt`` up to the end-of-turn token."""
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        sample = self.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs["temperature"] = self.temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        # generate() samples from torch's global RNG: seed a forked copy from our own stream
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.rng))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                eos_token_id=self.stop_ids or None,
                pad_token_id=self.pad_id,
                **kwargs,
            )
        text = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
        for stop in END_OF_TURN_TOKENS:
            text = text.split(stop, 1)[0]
        return text


def _right_pad(
    seqs: Sequence[tuple[list[int], list[bool]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int64 [B, T], attention int64 [B, T], score mask bool [B, T]), right-padded."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, (seq, m) in enumerate(seqs):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        mask[b, : len(seq)] = torch.tensor(m, dtype=torch.bool)
    return ids, attn, mask
