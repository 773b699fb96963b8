"""Finding and replacing the submodules of a model: the one place the model-level helpers
(LoRA injection, quantization, QAT, bottleneck adapters, freezing) select layers and swap them.

Names follow PEFT's rule (``name_matches``): a list entry matches a qualified module name it
equals or ends with after a dot; a string is a regular expression that must match the whole
name. Transformer blocks and their two output projections are found by name on Hugging Face
BERT / RoBERTa, GPT-2 and Llama / Mistral layouts (``find_blocks``).

Regular expressions may come from untrusted files (an adapter_config.json's target_modules,
rank_pattern, layers_pattern, ...), and Python's ``re`` backtracks: ``(.*)*(.*)*X`` never returns
on a 40-character name. ``regex_match`` bounds the work instead of guessing from the syntax:
it parses the pattern with ``re``'s own parser and counts every way each part can match (for
any name of that length, then, if that is too many, on the name itself: sequences chain the
positions their parts reach, alternatives add, a repetition sums its iterations); the engine
takes at most as many steps. A pattern whose bound exceeds ``MAX_MATCH_STEPS`` is refused with a
ValueError; the others are matched by ``re`` itself, exactly as PEFT matches them.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from .nn.bottleneck import BottleneckAdapter

ALL_LINEAR = "all-linear"

TargetModules = Union[str, Sequence[str]]


def output_layer_name(model: nn.Module) -> str | None:
    """Qualified name of ``model.get_output_embeddings()`` (the LM head), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        out = getter()
    except (NotImplementedError, AttributeError):
        return None
    if out is None:
        return None
    return next((name for name, m in model.named_modules() if m is out), None)


class Pattern(str):
    """A pattern string that remembers where it came from (``what``: the field and the file), so
    that an error about it can say so."""

    def __new__(cls, value: str, what: str):
        self = super().__new__(cls, value)
        self.what = what
        return self


def name_matches(name: str, target_modules: TargetModules, what: str | None = None) -> bool:
    """PEFT's rule: a regex string full-matches ``name`` (its work bounded: ``regex_match``;
    ``what``, else a Pattern's own, names the pattern in errors); a list entry equals ``name``
    or is a suffix of it after a dot."""
    if isinstance(target_modules, str):
        what = what or getattr(target_modules, "what", "target_modules")
        return regex_match(target_modules, name, what) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def check_target_modules(target_modules: object) -> TargetModules:
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return ALL_LINEAR
        compile_regex(target_modules, "target_modules")
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        entries = list(target_modules)
        if not entries or not all(isinstance(t, str) and t for t in entries):
            raise ValueError(f"target_modules must be a non-empty list of non-empty names, a regex "
                             f"string or {ALL_LINEAR!r}; got {target_modules!r}")
        return entries
    raise TypeError(f"target_modules must be a list of names, a regex string or {ALL_LINEAR!r}, "
                    f"got {type(target_modules).__name__}")


def fastpeft_internal_names(model: nn.Module) -> set[str]:
    """Qualified names of the modules inside fastpeft's own trainable modules (a BottleneckAdapter's
    ``down`` / ``up`` linears): the walkers over a base model's layers ("all-linear" LoRA,
    quantization, QAT) leave them alone."""
    prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, BottleneckAdapter))
    if not prefixes:
        return set()
    return {n for n, _ in model.named_modules() if n.startswith(prefixes)}


# The attribute under which a training wrapper keeps the module it wraps, and which that wrapper
# puts into the qualified names of everything inside it: torch.compile's OptimizedModule
# (_orig_mod), FSDP1's FullyShardedDataParallel (_fsdp_wrapped_module), activation
# checkpointing's CheckpointWrapper (_checkpoint_wrapped_module). DDP and DataParallel keep it
# as ``.module`` (at the root only). FSDP2's fully_shard adds no module and no name.
WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside the wrappers at the root of ``model``: DistributedDataParallel /
    DataParallel (``.module``), torch.compile (``._orig_mod``), FSDP1 and activation checkpointing
    (their wrapped module), as often as they are stacked. Nested wrappers (FSDP1 units, compiled
    or checkpointed blocks) stay: ``canonical_name`` removes them from names."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        inner = next((model._modules[a] for a in WRAPPER_SEGMENTS if a in model._modules), None)
        if inner is None:
            return model
        model = inner


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers insert (WRAPPER_SEGMENTS): the name the same module
    or tensor has in the unwrapped model, as ``torch.distributed.checkpoint`` names it."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model`` (a direct child of its parent)."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def plain_linear_names(model: nn.Module, skip: Sequence[str] | str = ()) -> list[str]:
    """Qualified names of the nn.Linear modules (exact type: subclasses such as
    MultiheadAttention's out_proj are read through .weight) not matched by ``skip`` and not
    inside fastpeft's own modules (a BottleneckAdapter's linears)."""
    skip = [skip] if isinstance(skip, str) else list(skip)
    inner = fastpeft_internal_names(model)
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n and n not in inner and not name_matches(n, skip)]


@dataclass(frozen=True)
class Architecture:
    """Where a transformer family keeps its blocks and its two output projections.

    ``blocks`` names the ModuleList of blocks (the qualified name equals it or ends with "."
    + it); ``attn_out`` / ``ffn_out`` are paths inside one block.
    """
    family: str
    blocks: str
    attn_out: str
    ffn_out: str

    def describe(self) -> str:
        return f"{self.family}: {self.blocks}.<i>.{self.attn_out} and {self.blocks}.<i>.{self.ffn_out}"


ARCHITECTURES = (
    Architecture("BERT / RoBERTa", "encoder.layer", "attention.output.dense", "output.dense"),
    Architecture("GPT-2", "h", "attn.c_proj", "mlp.c_proj"),
    Architecture("Llama / Mistral", "layers", "self_attn.o_proj", "mlp.down_proj"),
)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_blocks(model: nn.Module) -> list[tuple[Architecture, str, nn.ModuleList]]:
    """(architecture, qualified name, block list) for every non-empty nn.ModuleList of ``model``
    whose name and blocks fit a known layout (each block holds both output projections)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for arch in ARCHITECTURES:
            if (name_matches(name, [arch.blocks])
                    and all(_has(b, arch.attn_out) and _has(b, arch.ffn_out) for b in module)):
                found.append((arch, name, module))
                break
    return found


def known_layouts() -> str:
    return "; ".join(a.describe() for a in ARCHITECTURES)


def output_width(module: nn.Module) -> int | None:
    """Width of the last dim a module outputs, where the module says it: ``out_features``
    (nn.Linear and fastpeft's linear layers) or ``nf`` (Hugging Face's Conv1D, GPT-2)."""
    width = getattr(module, "out_features", None)
    if width is None and type(module).__name__ == "Conv1D":
        width = getattr(module, "nf", None)
    return width if isinstance(width, int) and not isinstance(width, bool) else None


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, torch's RMSNorm, or a model's own *LayerNorm / *RMSNorm class (LlamaRMSNorm)."""
    if isinstance(module, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    tensors = list(module.parameters()) + list(module.buffers())
    floating = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else None
    return device, (floating[0].dtype if floating else None)


# ---------------------------------------------------------------------------------------------
# regular expressions from untrusted files: a bound on the backtracking engine's work

try:  # Python >= 3.11
    from re import _constants as _sre, _parser as _sre_parse
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _sre
    import sre_parse as _sre_parse

MAX_PATTERN_CHARS = 1 << 16  # room for a regex that spells out every adapted path of a large model
# Steps of Python's regex engine one match may take: about 4 ms (measured: up to 21 ns per step
# counted here), far above what real patterns need on real names (hundreds to some 10^4), far
# below the 2^40 of a catastrophic one. A load matches each pattern against every module name, so
# a pattern crafted to sit just under it costs a few ms per module, never a hang.
MAX_MATCH_STEPS = 2 * 10**5
MAX_NAME_CHARS = 1024   # a module name longer than this is never matched against a regex
NAME_BOUND_MIN = 64     # the quick bound is worked out for names in length classes 64, 128, 256, ...
MAX_PATTERN_DEPTH = 64  # groups nested deeper are refused (the analysis recurses over them)
_CAP = 1e30             # counts saturate here, far above MAX_MATCH_STEPS (no float overflow)

_ONE_CHAR = {_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN}
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT} | {getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_ASSERTS = {_sre.ASSERT, _sre.ASSERT_NOT}
_ATOMIC = getattr(_sre, "ATOMIC_GROUP", None)


class _Unbounded(Exception):
    """The bound passed MAX_MATCH_STEPS (the analysis stops there)."""


def compile_regex(pattern: str, what: str = "target_modules") -> re.Pattern:
    """``re.compile(pattern)`` for a pattern from a config: a ValueError naming ``what`` for a
    pattern that is too long or does not compile (whatever ``re`` raises)."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a str, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} is a regex of {len(pattern)} characters; at most {MAX_PATTERN_CHARS} "
                         f"are accepted")
    return _compiled(pattern, what)


def _compiled(pattern: str, what: str) -> re.Pattern:
    try:
        return _compile_cached(pattern)
    except (re.error, OverflowError, RecursionError, MemoryError) as e:
        raise ValueError(f"{what} {_short(pattern)} is not a valid regex: {e or type(e).__name__}") from None


@functools.lru_cache(maxsize=4096)
def _compile_cached(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def regex_match(pattern: str, name: str, what: str = "target_modules", full: bool = True) -> re.Match | None:
    """``re.fullmatch(pattern, name)`` (``re.match`` when not ``full``), PEFT's matching, once it is
    shown that Python's backtracking engine takes at most ``MAX_MATCH_STEPS`` steps on it (see the
    module docstring); a ValueError naming ``what`` otherwise.

    Two bounds, the first that passes decides: a quick one, for any name of the length class of
    ``name`` with any characters (cached per pattern), then one worked out on ``name`` itself,
    for the patterns whose alternatives or repetitions only look ambiguous until the characters
    are known (``(?:\\w+\\.)*q_proj``)."""
    compiled = compile_regex(pattern, what)
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{what} is a regex, and module name {name[:80]!r}... has {len(name)} characters: "
                         f"fastpeft matches regexes against names of at most {MAX_NAME_CHARS}")
    bound = max(NAME_BOUND_MIN, 1 << max(len(name) - 1, 0).bit_length())
    if _quick_bound(pattern, bound) > MAX_MATCH_STEPS and _name_bound(pattern, name) > MAX_MATCH_STEPS:
        raise ValueError(f"{what} {_short(pattern)} could take Python's backtracking regex engine more than "
                         f"{MAX_MATCH_STEPS:.0e} steps on module {name!r} (nested or overlapping repetitions, "
                         f"as in '(a+)+' or '(.*)*'); fastpeft refuses it rather than risk a match that never "
                         f"returns. Name the modules in a list, or simplify the pattern")
    return compiled.fullmatch(name) if full else compiled.match(name)


def _short(pattern: str, limit: int = 200) -> str:
    return repr(pattern) if len(pattern) <= limit else repr(pattern[:limit]) + f"... ({len(pattern)} characters)"


def _work(parsed, steps: float, ways: float) -> float:
    """Engine steps from a pattern's attempts and its ways to match (one final check each); marks
    of capture groups are saved and restored per group when the engine backtracks."""
    return (steps + ways) * max(parsed.state.groups, 1)


@functools.lru_cache(maxsize=4096)
def _quick_bound(pattern: str, n: int) -> float:
    """Steps bound of ``pattern`` on any name of up to ``n`` characters (inf: over the limit)."""
    parsed = _sre_parse.parse(pattern)
    try:
        ways, steps = _AnyName(n).sequence(parsed, 0)
    except _Unbounded:
        return float("inf")
    return _work(parsed, steps, float(ways.sum()))


def _name_bound(pattern: str, name: str) -> float:
    """Steps bound of ``pattern`` on ``name`` (inf: over the limit)."""
    parsed = _sre_parse.parse(pattern)
    start = np.zeros((1, len(name) + 1))
    start[0, 0] = 1.0
    caseless = parsed.state.flags & re.IGNORECASE != 0
    try:
        ends, steps = _OneName(name).sequence(parsed, start, caseless, 0)
    except _Unbounded:
        return float("inf")
    return _work(parsed, float(steps.sum()), float(ends.sum()))


class _AnyName:
    """The quick bound: for names of up to ``n`` characters, how many ways each part of a parsed
    pattern can match (``ways[k]``: ending k characters further, characters ignored, so an upper
    bound) and how many steps trying it takes (``steps``, not counting what follows it). A
    backtracking engine runs what follows a part once per way the part matched: a sequence's
    steps are its parts' steps times the ways to reach them."""

    def __init__(self, n: int):
        self.n = n
        self.empty = np.ones(1)           # matches the empty string, one way
        self.one = np.array([0.0, 1.0])   # one character, one way

    def _conv(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.minimum(np.convolve(a, b)[: self.n + 1], _CAP)

    def sequence(self, items, depth: int) -> tuple[np.ndarray, float]:
        ways, steps = self.empty, 0.0
        for op, av in items:
            if not ways.any():  # nothing reaches the rest (names are too short for it)
                break
            part_ways, part_steps = self.node(op, av, depth)
            steps = _checked(steps + float(ways.sum()) * part_steps)
            ways = self._conv(ways, part_ways)
        return ways, steps

    def node(self, op, av, depth: int) -> tuple[np.ndarray, float]:
        if op in _ONE_CHAR:
            return self.one, 1.0
        if op is _sre.AT:
            return self.empty, 1.0
        if depth >= MAX_PATTERN_DEPTH:
            raise _Unbounded
        if op is _sre.SUBPATTERN:
            ways, steps = self.sequence(av[-1], depth + 1)
            return ways, steps + 1
        if op is _sre.BRANCH:
            ways, steps = np.zeros(1), 1.0
            for alternative in av[1]:
                w, s = self.sequence(alternative, depth + 1)
                ways, steps = _added(ways, w), _checked(steps + s)
            return ways, steps
        if op in _REPEATS:
            lo, hi, body = av
            return self.repeat(lo, hi, *self.sequence(body, depth + 1))
        if op in _ASSERTS:  # zero width; what follows runs at most once
            return self.empty, self.sequence(av[1], depth + 1)[1] + 1
        if op is _ATOMIC:  # what follows runs once, after one of the inner part's ends
            ways, steps = self.sequence(av, depth + 1)
            return np.minimum(ways, 1.0), steps + 1
        if op is _sre.GROUPREF:  # any length, compared character by character
            return np.ones(self.n + 1), float(self.n + 1)
        if op is _sre.GROUPREF_EXISTS:
            _, yes, no = av
            ways, steps = self.sequence(yes, depth + 1)
            w, s = self.sequence(no or [], depth + 1)
            return _added(ways, w), _checked(steps + s + 1)
        raise _Unbounded  # pragma: no cover - an opcode this analysis does not know: refuse

    def repeat(self, lo: int, hi: int, body_ways: np.ndarray, body_steps: float) -> tuple[np.ndarray, float]:
        """``body{lo,hi}``: the ways after j iterations are ``body_ways`` convolved j times. Past
        ``lo`` the engine ends the loop after an iteration that consumed nothing (what follows
        runs, no further iteration), so at most lo + n + 1 iterations are tried."""
        n = self.n
        last = min(hi, lo + n + 1)
        if np.array_equal(body_ways, self.one) and body_steps == 1.0:  # x*, [a-z]{2,5}: one way per length
            ways = np.zeros(n + 1)
            ways[min(lo, n + 1): min(hi, n) + 1] = 1.0
            return ways, float(min(hi, n) + 1)
        moving = body_ways.copy()
        moving[0] = 0.0
        ways, total, steps, j = self.empty, np.zeros(1), 1.0, 0
        while True:
            if j >= lo:
                total = _added(total, ways)
            if j == last or not ways.any():
                return total, steps
            steps = _checked(steps + float(ways.sum()) * (body_steps + 1))
            if j >= lo:
                total = _added(total, ways * body_ways[0])
                ways, j = self._conv(ways, moving), j + 1
                continue
            following = self._conv(ways, body_ways)
            if np.array_equal(following, ways):  # a zero-width body: the same iteration until lo
                steps = _checked(steps + (lo - j - 1) * float(ways.sum()) * (body_steps + 1))
                j = lo
                continue
            ways, j = following, j + 1


class _OneName:
    """The same count on one name, its characters considered, for several start positions at
    once: row k of ``r`` counts the ways to be at each position of the name (0..n) having
    started from start k, and ``steps[k]`` the engine's steps from there. Which characters a
    node matches is over-approximated (a class with a negation, or a range under IGNORECASE,
    matches anything), so the counts stay upper bounds."""

    def __init__(self, name: str):
        self.name, self.n = name, len(name)
        self.codes = np.array([ord(c) for c in name], dtype=np.int64)
        self.lower = np.array([ord(c.lower()) if c.isascii() else -1 for c in name], dtype=np.int64)
        self.categories: dict = {}
        self.matrices: dict = {}
        span = np.arange(self.n + 1)
        self.distance = span[None, :] - span[:, None]  # j - i

    # which positions a single-character node matches
    def _mask(self, op, av, caseless: bool) -> np.ndarray:
        if op is _sre.LITERAL:
            return self._literal(av, caseless)
        if op is _sre.IN and not any(kind is _sre.NEGATE for kind, _ in av):
            mask = np.zeros(self.n, dtype=np.bool_)
            for kind, value in av:
                if kind is _sre.LITERAL:
                    mask |= self._literal(value, caseless)
                elif kind is _sre.RANGE and not caseless:
                    mask |= (self.codes >= value[0]) & (self.codes <= value[1])
                elif kind is _sre.CATEGORY and value in _CATEGORIES:
                    if value not in self.categories:
                        self.categories[value] = np.array([_CATEGORIES[value](c) for c in self.name], dtype=np.bool_)
                    mask |= self.categories[value]
                else:
                    return np.ones(self.n, dtype=np.bool_)
            return mask
        return np.ones(self.n, dtype=np.bool_)

    def _literal(self, code: int, caseless: bool) -> np.ndarray:
        if not caseless:
            return self.codes == code
        if code >= 128:
            return np.ones(self.n, dtype=np.bool_)
        return (self.lower == ord(chr(code).lower())) | (self.lower < 0)

    def sequence(self, items, r: np.ndarray, caseless: bool, depth: int) -> tuple[np.ndarray, np.ndarray]:
        steps = np.zeros(len(r))
        for op, av in items:
            if not r.any():
                break
            r, part_steps = self.node(op, av, r, caseless, depth)
            steps = steps + part_steps
            _checked(float(steps.max()))
        return r, steps

    def node(self, op, av, r: np.ndarray, caseless: bool, depth: int) -> tuple[np.ndarray, np.ndarray]:
        reach = r.sum(axis=1)
        if op in _ONE_CHAR:
            out = np.zeros_like(r)
            out[:, 1:] = r[:, :-1] * self._mask(op, av, caseless)
            return out, reach
        if op is _sre.AT:
            return r, reach
        if depth >= MAX_PATTERN_DEPTH:
            raise _Unbounded
        if op is _sre.SUBPATTERN:
            _, add_flags, del_flags, body = av
            inner = (caseless or add_flags & re.IGNORECASE != 0) and del_flags & re.IGNORECASE == 0
            out, steps = self.sequence(body, r, inner, depth + 1)
            return out, steps + reach
        if op is _sre.BRANCH:
            out, steps = np.zeros_like(r), reach
            for alternative in av[1]:
                o, s = self.sequence(alternative, r, caseless, depth + 1)
                out, steps = np.minimum(out + o, _CAP), steps + s
            return out, steps
        if op in _REPEATS:
            return self.repeat(av, r, caseless, depth)
        if op in _ASSERTS:  # zero width; what follows runs at most once
            _, attempts = self.matrix(av[1], caseless, depth + 1)
            cost = r @ attempts if av[0] == 1 else reach * float(attempts.max())
            return r, cost + reach
        if op is _ATOMIC:  # what follows runs once, after one of the inner part's ends
            ends, attempts = self.matrix(av, caseless, depth + 1)
            return np.minimum(r @ np.minimum(ends, 1.0), _CAP), r @ attempts + reach
        if op is _sre.GROUPREF:  # any length, compared character by character
            return np.minimum(np.cumsum(r, axis=1), _CAP), reach * (self.n + 1)
        if op is _sre.GROUPREF_EXISTS:
            _, yes, no = av
            out, steps = self.sequence(yes, r, caseless, depth + 1)
            o, s = self.sequence(no or [], r, caseless, depth + 1)
            return np.minimum(out + o, _CAP), steps + s + reach
        raise _Unbounded  # pragma: no cover - an opcode this analysis does not know: refuse

    def matrix(self, items, caseless: bool, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(ways from position i to position j, steps of an attempt from i) of a part."""
        key = (id(items), caseless)
        if key not in self.matrices:
            self.matrices[key] = self.sequence(items, np.eye(self.n + 1), caseless, depth)
        return self.matrices[key]

    def repeat(self, av, r: np.ndarray, caseless: bool, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """As ``_AnyName.repeat``, on the name: past ``lo`` an iteration that consumed nothing
        leads to what follows, never to another iteration."""
        lo, hi, body = av
        n, reach = self.n, r.sum(axis=1)
        if len(body) == 1 and body[0][0] in _ONE_CHAR:  # x*, [a-z]{2,5}: the engine scans, then backs off
            mask = self._mask(*body[0], caseless)
            run = np.zeros(n + 1, dtype=np.int64)  # matching characters from each position on
            for i in range(n - 1, -1, -1):
                run[i] = run[i + 1] + 1 if mask[i] else 0
            longest = np.minimum(run, min(hi, n))
            ways = (self.distance >= lo) & (self.distance <= longest[:, None])
            return np.minimum(r @ ways, _CAP), r @ (longest + 1.0) + reach
        ends, attempts = self.matrix(body, caseless, depth + 1)
        moving = ends * (self.distance > 0)  # iterations that consumed a character
        empty = np.diag(ends)
        last = min(hi, lo + n + 1)
        cur, out, steps, j = r, np.zeros_like(r), reach, 0
        while True:
            if j >= lo:
                out = np.minimum(out + cur, _CAP)
            if j == last or not cur.any():
                return out, steps
            steps = steps + cur @ attempts + cur.sum(axis=1)
            _checked(float(steps.max()))
            if j >= lo:
                out = np.minimum(out + cur * empty, _CAP)
                cur, j = np.minimum(cur @ moving, _CAP), j + 1
                continue
            following = np.minimum(cur @ ends, _CAP)
            if np.array_equal(following, cur):  # the same iteration again and again until lo
                steps = steps + (lo - j - 1) * (cur @ attempts + cur.sum(axis=1))
                _checked(float(steps.max()))
                j = lo
                continue
            cur, j = following, j + 1


_CATEGORIES = {  # supersets of what re's categories match, Unicode and ASCII alike
    _sre.CATEGORY_DIGIT: lambda c: c.isdecimal() or c.isdigit(),
    _sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    _sre.CATEGORY_SPACE: str.isspace,
}


def _checked(steps: float) -> float:
    if steps > MAX_MATCH_STEPS:
        raise _Unbounded
    return steps


def _added(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)))
    out[: len(a)] += a
    out[: len(b)] += b
    return np.minimum(out, _CAP)
