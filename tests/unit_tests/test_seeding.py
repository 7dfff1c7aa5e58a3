"""No two random streams that can meet in one run draw the same numbers.

A stream's seed is numpy's SeedSequence hash of its int words (fedrun/seeding.py), so two draws
share numbers exactly when their words are equal after SeedSequence's zero padding to 4 words.
Checked here: the registry (``seeding.STREAMS``) has distinct tags and sub-tags, and no two of its
streams can produce the same words unless the config keeps them apart (``Stream.only``); every
call of ``derive_seed`` / ``generator`` / ``sobol_engine`` / ``stream_seed`` / ``stream_generator``
in the package is one of those streams (read statically with ``ast``: a registered tag first, as
many parts as the stream has; or a registered stream name with exactly its parts); and every
other seeded generator in the package takes a derived seed or is a documented raw-seed use.
"""

from __future__ import annotations

import ast
import itertools

import pytest

from fedrun import seeding
from fedrun.errors import ConfigError
from fedrun.seeding import STREAMS, Stream

from helpers import ROOT

PACKAGE = ROOT / "fedrun"
SEED_CALLS = {"derive_seed", "generator", "sobol_engine", "stream_seed", "stream_generator"}
RAW_SEEDERS = {"manual_seed", "manual_seed_all", "default_rng", "RandomState", "SeedSequence"}


# --------------------------------------------------------------------------------------------
# The words a stream hashes, and when two streams can hash the same words


def pattern(stream: Stream) -> list[int | None]:
    """The stream's words, None where a part varies, zero-padded as SeedSequence pads them."""
    words: list[int | None] = [stream.tag, *(p if isinstance(p, int) else None for p in stream.parts)]
    return words + [0] * (4 - len(words))


def can_collide(a: Stream, b: Stream) -> bool:
    """Some values of their parts give both streams the same words."""
    pa, pb = pattern(a), pattern(b)
    return len(pa) == len(pb) and all(x is None or y is None or x == y for x, y in zip(pa, pb, strict=True))


def exclusive(a: Stream, b: Stream) -> bool:
    """No config draws both: they ask different values of one key."""
    return any(a.only[k] != b.only[k] for k in a.only.keys() & b.only.keys())


def collisions(streams: dict[str, Stream]) -> list[tuple[str, str]]:
    return [(m, n) for (m, a), (n, b) in itertools.combinations(streams.items(), 2)
            if can_collide(a, b) and not exclusive(a, b)]


def test_the_padding_model_is_numpys():
    # what pattern() assumes: up to 4 words, trailing zeros do not count; from 5 words on they do
    assert seeding.derive_seed(3, 1, 2) == seeding.derive_seed(3, 1, 2, 0)
    assert seeding.derive_seed(1, 2, 3, 4, 5) != seeding.derive_seed(1, 2, 3, 4, 5, 0)
    assert seeding.derive_seed(3, 1, 2) != seeding.derive_seed(3, 1, 2, 1)


def test_a_part_of_two_words_is_refused():
    # 2**32 + 1 would hash as the words (1, 1): the stream of other parts
    with pytest.raises(ConfigError, match="run.seed"):
        seeding.derive_seed(seeding.INIT, 2**32 + 1)
    assert seeding.derive_seed(seeding.INIT, 2**32 - 1) != seeding.derive_seed(seeding.INIT, 0)


def test_tags_and_sub_tags_are_distinct_and_registered():
    assert len(set(seeding.TAGS.values())) == len(seeding.TAGS)
    assert all(getattr(seeding, name) == value for name, value in seeding.TAGS.items())
    by_tag: dict[int, list[int]] = {}
    for name, (tag, value) in seeding.SUB_TAGS.items():
        assert tag in seeding.TAGS.values() and getattr(seeding, name) == value
        by_tag.setdefault(tag, []).append(value)
    assert all(len(set(values)) == len(values) for values in by_tag.values())
    for name, stream in STREAMS.items():
        assert stream.tag in seeding.TAGS.values(), name
        for part in stream.parts:
            assert isinstance(part, str) or (stream.tag, part) in seeding.SUB_TAGS.values(), (name, part)
        names = [p for p in stream.parts if isinstance(p, str)]
        assert len(set(names)) == len(names), name


def test_no_two_streams_of_one_run_share_words():
    assert collisions(dict(STREAMS)) == []


def test_the_collision_check_sees_a_collision():
    # the client grid as it was: a second use of (seed, round, client) words under CLIENT
    grid = Stream(seeding.CLIENT, ("seed", "round", "client"), "a local model's grid")
    assert ("client", "old_client_grid") in collisions({**STREAMS, "old_client_grid": grid})
    # a shorter stream meets a longer one through the zero padding
    short = Stream(seeding.SELECT, ("seed",), "x")
    assert ("select", "short") in collisions({**STREAMS, "short": short})


def test_the_client_grid_is_no_training_stream():
    """run.seed = 1: client k's round-1 grid drew client k's round-2 training stream."""
    for k in range(4):
        grid = seeding.stream_seed("client_grid", seed=1, round=1, client=k)
        assert grid != seeding.derive_seed(seeding.CLIENT, 1, 2, k)
        assert grid != seeding.derive_seed(1, 1, seeding.CLIENT, k)  # the old untagged seed


def test_the_global_models_samples_keep_their_numbers():
    """Runs scored and drew their grids with these words: the named streams must equal them."""
    s, r, j = 3, 7, 2
    assert seeding.stream_seed("eval_samples", seed=s, round=r, chunk=j) == seeding.derive_seed(4, s, r, 1, j)
    assert seeding.stream_seed("final_grid", seed=s, round=r, chunk=j) == seeding.derive_seed(4, s, r, 0, j)
    assert seeding.stream_seed("client_eval", seed=s, round=r, client=1, chunk=j) == \
        seeding.derive_seed(4, s, r, 3, 1, j)
    with pytest.raises(TypeError, match="expected"):
        seeding.stream_seed("final_grid", seed=s, round=r)  # a part left out


# --------------------------------------------------------------------------------------------
# Every call in the package draws a registered stream


def _seeding_names(tree: ast.Module) -> tuple[set[str], dict[str, str]]:
    """Names the module gives fedrun.seeding, and names it imported from it (local -> original)."""
    aliases, imported = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name == "seeding":
                    aliases.add(a.asname or a.name)
                elif (node.module or "").endswith("seeding"):
                    imported[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "fedrun.seeding" and a.asname:
                    aliases.add(a.asname)
    return aliases, imported


def _seeding_attr(node: ast.expr, aliases: set[str], imported: dict[str, str]) -> str | None:
    """``seeding.X`` or an X imported from seeding: "X"; else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
        return node.attr
    if isinstance(node, ast.Name) and node.id in imported:
        return imported[node.id]
    return None


def check_source(source: str) -> tuple[list[str], set[str]]:
    """(problems, names of the streams drawn) of one module's seeding calls."""
    tree = ast.parse(source)
    aliases, imported = _seeding_names(tree)
    problems, used = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        call = _seeding_attr(node.func, aliases, imported)
        if call not in SEED_CALLS:
            continue
        where = f"line {node.lineno}: {ast.unparse(node)}"
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            problems.append(f"{where}: *args/**kwargs hide which stream it is")
            continue
        if call in ("stream_seed", "stream_generator"):
            args = node.args[1:] if call == "stream_generator" else node.args
            name = args[0].value if args and isinstance(args[0], ast.Constant) else None
            if name not in STREAMS or len(args) != 1:
                problems.append(f"{where}: the stream must be a registered name, written out")
                continue
            wanted = sorted(p for p in STREAMS[name].parts if isinstance(p, str))
            if sorted(k.arg for k in node.keywords) != wanted:
                problems.append(f"{where}: stream {name!r} takes exactly {wanted}")
                continue
            used.add(name)
            continue
        parts = node.args[1:] if call == "generator" else node.args
        if call == "sobol_engine":
            tag = seeding.SOBOL
        else:
            first = _seeding_attr(parts[0], aliases, imported) if parts else None
            if first not in seeding.TAGS:
                problems.append(f"{where}: the first part must be a tag of seeding.TAGS")
                continue
            tag, parts = seeding.TAGS[first], parts[1:]
        matches = [name for name, s in STREAMS.items() if s.tag == tag and len(s.parts) == len(parts)
                   and all(isinstance(p, str) or _sub_tag_value(a, aliases, imported) == p
                           for p, a in zip(s.parts, parts, strict=True))]
        if not matches:
            problems.append(f"{where}: no registered stream of tag {tag} has these {len(parts)} parts")
        used.update(matches)
    return problems, used


def _sub_tag_value(node: ast.expr, aliases: set[str], imported: dict[str, str]) -> int | None:
    name = _seeding_attr(node, aliases, imported)
    return seeding.SUB_TAGS[name][1] if name in seeding.SUB_TAGS else None


def package_sources() -> dict[str, str]:
    """module name -> source, for every module of fedrun but seeding itself."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module != "fedrun.seeding":
            out[module] = path.read_text()
    return out


def test_every_seeding_call_draws_a_registered_stream():
    problems, used = [], set()
    for module, source in package_sources().items():
        found, names = check_source(source)
        problems += [f"{module}: {p}" for p in found]
        used |= names
    assert problems == []
    assert set(STREAMS) - used == set()  # no stale entry: every registered stream is drawn


def test_the_call_check_sees_an_untagged_or_unknown_draw():
    head = "from fedrun import seeding\n"
    old_grid = head + "g = seeding.generator(device, seed, round_, CLIENT, client)\n"
    assert check_source(old_grid)[0]  # the client grid as it was: no tag first
    assert check_source(head + "g = seeding.generator('cpu', seeding.CLIENT, seed, round_)\n")[0]  # arity
    assert check_source(head + "g = seeding.generator('cpu', seeding.SAMPLE, *parts, j)\n")[0]
    assert check_source(head + "s = seeding.stream_seed('nope', seed=1)\n")[0]
    assert check_source(head + "s = seeding.stream_seed('client_grid', seed=1, round=2)\n")[0]
    assert check_source(head + "g = seeding.stream_generator(d, name, seed=1, round=2, client=3)\n")[0]
    ok, used = check_source(head + "from fedrun.seeding import derive_seed, CLIENT\n"
                            "s = derive_seed(CLIENT, seed, round_, client)\n")
    assert ok == [] and "client" in used


# --------------------------------------------------------------------------------------------
# Other seeded generators: from a derived seed, or a documented raw-seed use


def raw_seed_uses(source: str, module: str) -> tuple[list[str], set[tuple[str, str]]]:
    """(seeded generators that take neither a derived seed nor are listed, the listed uses seen)."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    problems, seen = [], set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        if name not in RAW_SEEDERS or not node.args:
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute | ast.Name) and \
                (arg.func.attr if isinstance(arg.func, ast.Attribute) else arg.func.id) in SEED_CALLS:
            continue
        func, up = None, parents.get(node)
        while up is not None and func is None:
            func = up.name if isinstance(up, ast.FunctionDef) else None
            up = parents.get(up)
        if (module, func) in seeding.RAW_SEED_USES:
            seen.add((module, func))
        else:
            problems.append(f"{module}.{func} line {node.lineno}: {ast.unparse(node)}")
    return problems, seen


def test_every_other_seeded_generator_is_derived_or_listed():
    problems, seen = [], set()
    for module, source in package_sources().items():
        found, listed = raw_seed_uses(source, module)
        problems += found
        seen |= listed
    assert problems == []
    assert set(seeding.RAW_SEED_USES) - seen == set()  # no stale entry
    assert raw_seed_uses("def f(seed):\n    torch.manual_seed(seed + 1)\n", "fedrun.x")[0]  # it can fail
