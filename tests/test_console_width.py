"""Console tables at 80 columns: every header whole and distinct, names shortened from the middle.

Each console view (info, analyze summary, heads, embeddings, clusters, compare, trajectory) is
rendered through the CLI into an 80-column console on real checkpoints (nanoGPT checkpoints written
the way its train.py writes them, with deliberately long file names). Headers are read back from
the rendered text, column by column, including the lines a wrapped header spans.
"""

from __future__ import annotations

import re

import pytest
import torch

import checkpoints
import layerscope
from layerscope.views import fitted_table, shorten_middle, shorten_unique, wrap_header

WIDTH = 80
LONG = "an-experiment-with-a-rather-long-descriptive-name_ckpt_"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three nanoGPT checkpoints of one run (steps 1000, 2000, 3000) with long names."""
    root = tmp_path_factory.mktemp("long-run")
    for i in range(3):
        checkpoints.build_nanogpt(root / f"{LONG}{(i + 1) * 1000:06d}.pt", seed=i, iter_num=(i + 1) * 1000)
    return root


@pytest.fixture()
def render(monkeypatch, capsys):
    """Run the CLI with an 80-column console; return what it printed."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    from layerscope.cli import main

    def go(*argv: str) -> str:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    return go


def header_rows(text: str) -> list[list[str]]:
    """For every table in ``text``: its column headers, each joined over the lines it wraps onto."""
    tables, block = [], []
    for line in text.splitlines():
        if "╇" in line:  # the rule under a header
            columns: list[list[str]] = []
            for hline in block:
                cells = hline.split("┃")
                if hline.startswith("┃"):
                    cells = cells[1:-1]
                for i, cell in enumerate(cells):
                    if len(columns) <= i:
                        columns.append([])
                    if cell.strip():
                        columns[i].append(cell.strip())
            tables.append([" ".join(c) for c in columns])
            block = []
        elif "┃" in line and "━" not in line:
            block.append(line)
        else:
            block = []
    return tables


def assert_fits(text: str) -> list[list[str]]:
    widest = max(len(line) for line in text.splitlines())
    assert widest <= WIDTH, f"a line of {widest} cells:\n{text}"
    tables = header_rows(text)
    for headers in tables:
        assert all("…" not in h for h in headers), headers
        assert len(set(headers)) == len(headers), headers
    return tables


def test_compare_headers_whole_and_tied_shown_once(run, render):
    ckpts = sorted(run.glob("*.pt"))
    out = render("compare", ckpts[0], ckpts[2])
    tables = assert_fits(out)
    by_role = next(t for t in tables if t[0] == "role")
    assert {"rel change", "cosine", "procrustes cosine", "Δ entropy rank", "Δ stable rank", "Δ alpha"} <= set(by_role)
    assert "embed.token*" in out and "lm_head " not in out.split("most changed")[0]
    assert "* tied: transformer.wte.weight = lm_head.weight" in " ".join(out.split())


def test_trajectory_checkpoint_names_are_shortened_from_the_middle(run, render):
    out = render("trajectory", run)
    tables = assert_fits(out)
    assert tables[0][:4] == ["step", "checkpoint", "drift from first", "drift from prev"]
    labels = re.findall(r"^\s*\d+ │ (\S+)", out, flags=re.M)
    assert len(labels) == 3 and len(set(labels)) == 3
    for step, label in zip((1000, 2000, 3000), labels):
        assert "…" in label and label.startswith("an-exp") and label.endswith(f"{step:06d}"), label


def test_analyze_heads_embeddings_clusters_info_fit(run, render, tmp_path):
    ckpt = sorted(run.glob("*.pt"))[0]
    outputs = {
        "analyze": render("analyze", ckpt, "--store", tmp_path / "s.sqlite"),
        "heads": render("heads", ckpt, "--store", tmp_path / "s.sqlite"),
        "embeddings": render("embeddings", ckpt, "--store", tmp_path / "s.sqlite", "--tokens", "a,b"),
        "clusters": render("clusters", ckpt, "--store", tmp_path / "s.sqlite", "--k-values", "2,3"),
        "info": render("info", ckpt),
    }
    tables = {name: assert_fits(text) for name, text in outputs.items()}
    assert tables["analyze"][0][:2] == ["layer", "attn.q"] and ["name", "shape", "entropy rank", "stable rank", "alpha"] \
        in tables["analyze"]
    assert tables["heads"][0] == ["layer", "QK eff.rank", "OV eff.rank", "QK asym", "OV λ>0", "OV copy", "QK ‖·‖₂", "OV ‖·‖₂"]
    assert tables["clusters"][0] == ["cluster", "size", "tokens nearest the centre"]
    assert "cosine mean ± std" in outputs["embeddings"] and "…" not in outputs["embeddings"]
    assert "family" in outputs["info"] and "nanogpt" in outputs["info"] and "…" not in outputs["info"]


def test_shorten_middle_keeps_start_and_end():
    name = "model.layers.17.self_attn.q_proj.weight"
    short = shorten_middle(name, 20)
    assert len(short) == 20 and short.startswith("model.lay") and short.endswith("roj.weight") and "…" in short
    assert shorten_middle(name, len(name)) == name
    # names that differ only in the middle stay distinct when a split allows it
    names = [f"blocks.{i}.attention.output.dense.weight" for i in (10, 11, 12)]
    short = shorten_unique(names, 14)
    assert len(set(short)) == 3 and all(len(s) <= 14 for s in short)


def test_wrapped_headers_lose_nothing():
    for label, width in (("Δ entropy rank", 7), ("procrustes cosine", 10), ("moe.expert.gate", 6),
                         ("sign_conflict[ft-a|ft-b]", 8), ("averyveryverylongword", 5)):
        lines = wrap_header(label, width).split("\n")
        assert all(len(x) <= width for x in lines), (label, lines)
        assert "".join(lines).replace(" ", "") == label.replace(" ", "")


def test_too_many_columns_are_left_out_with_a_note():
    headers = ["name"] + [f"metric number {i}" for i in range(20)]
    rows = [["a.very.long.tensor.name.weight", *["0.123"] * 20]]
    table = fitted_table("t", headers, rows, WIDTH, shrink=0)
    from rich.console import Console

    console = Console(width=WIDTH, record=True, file=open("/dev/null", "w"))
    console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    shown = header_rows(text)[0]
    assert len(set(shown)) == len(shown) and "metric number 19" not in shown
    assert "not shown at this width" in text and "metric number 19" in text


def test_untied_copy_keeps_both_rows(tmp_path):
    """A fine-tune that unties lm_head from wte: its two rows differ, so both stay."""
    a = checkpoints.build_nanogpt(tmp_path / "a", seed=0)
    ck = torch.load(a, weights_only=False)
    state = ck["model"]
    head = next(k for k in state if k.endswith("lm_head.weight"))
    state[head] = state[head].clone() + 0.05 * torch.randn_like(state[head])
    b = tmp_path / "b" / "ckpt.pt"
    b.parent.mkdir()
    torch.save(ck, b)
    table = layerscope.compare(a, b, spectral=False).table.set_index("name")
    assert "lm_head.weight" in table.index and table.loc["transformer.wte.weight", "tied"] == ""
    assert table.loc["lm_head.weight", "rel_change"] > table.loc["transformer.wte.weight", "rel_change"]


def test_tied_copy_is_one_row_with_the_drift_of_both(run):
    a, _, b = sorted(run.glob("*.pt"))
    table = layerscope.compare(a, b, spectral=False).table.set_index("name")
    assert "lm_head.weight" not in table.index
    assert table.loc["transformer.wte.weight", "tied"] == "lm_head.weight"
    sa = torch.load(a, weights_only=True)["model"]
    sb = torch.load(b, weights_only=True)["model"]
    key = lambda s, n: next(k for k in s if k.endswith(n))  # noqa: E731  (compiled: _orig_mod. prefix)
    for name in ("transformer.wte.weight", "lm_head.weight"):  # the dropped row's drift is the kept one's
        wa, wb = sa[key(sa, name)].double(), sb[key(sb, name)].double()
        rel = float(torch.linalg.norm(wb - wa) / torch.linalg.norm(wa))
        assert table.loc["transformer.wte.weight", "rel_change"] == pytest.approx(rel, rel=1e-9)
