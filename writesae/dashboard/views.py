"""HTML fragments of the dashboard: the atom list, an atom's page, the header summary.

These functions are the dashboard's only renderer. The self-contained page (`writesae.dashboard.page`)
embeds their output, and notebooks display the same fragments inline (`notebook_html`), so the two
always show the same thing. Fragments use only the classes of ``assets/dashboard.css`` (all under
``.wsd``) and need no JavaScript; the page's script adds sorting and navigation on top.
"""

from __future__ import annotations

from html import escape
from importlib import resources
from typing import Any

from .data import AtomRecord, Context, DashboardData
from .svg import bar_chart, number

__all__ = ["atom_list", "atom_page", "summary", "notebook_html", "stylesheet", "token_text", "percent"]

_VISIBLE = str.maketrans({"\n": "↵", "\t": "⇥", "\r": "␍"})
LEVELS = 10  # highlight levels h0..h9 of the stylesheet


def stylesheet() -> str:
    """The dashboard's CSS (every rule scoped under ``.wsd``)."""
    return resources.files(__package__).joinpath("assets/dashboard.css").read_text(encoding="utf-8")


def notebook_html(fragment: str) -> str:
    """A fragment with its stylesheet, ready for a notebook's HTML output."""
    return f'<div class="wsd"><style>{stylesheet()}</style>{fragment}</div>'


def token_text(token: str) -> str:
    """A token as shown: escaped, with newlines and tabs made visible."""
    return escape(token.translate(_VISIBLE))


def percent(x: float) -> str:
    """A frequency as a percentage with 3 significant digits."""
    return f"{100 * x:.3g}%"


def _context(ctx: Context, scale: float) -> str:
    spans = []
    for j, (token, value) in enumerate(zip(ctx.tokens, ctx.values)):
        level = 0 if scale <= 0 or value <= 0 else min(LEVELS - 1, 1 + int(value / scale * (LEVELS - 1)))
        classes = " ".join(([f"h{level}"] if level else []) + (["c"] if j == ctx.center else []))
        attributes = (f' class="{classes}"' if classes else "") + (f' title="{value:.3g}"' if value > 0 else "")
        spans.append(f"<i{attributes}>{token_text(token)}</i>")  # short markup: pages hold thousands of tokens
    return (
        f'<div class="wsd-ctx"><span class="wsd-val">{number(ctx.value)}</span>'
        f'<span class="wsd-where">seq {ctx.sequence} pos {ctx.position}</span>'
        f'<span class="wsd-text">{"".join(spans)}</span></div>'
    )


def _contexts(contexts: list[Context], empty: str) -> str:
    if not contexts:
        return f'<p class="wsd-note">{escape(empty)}</p>'
    scale = max(max(c.values) for c in contexts)
    return "".join(_context(c, scale) for c in contexts)


def _token_table(pairs: list[list[Any]], css: str) -> str:
    rows = "".join(f'<tr><td class="tok">{token_text(t)}</td><td class="num">{v:+.3g}</td></tr>' for t, v in pairs)
    return f'<table class="wsd-tokens {css}">{rows}</table>'


def _value_tokens(record: AtomRecord) -> str:
    parts = []
    for r, side in enumerate(record.value_tokens):
        title = f"<h4>value factor {r}</h4>" if len(record.value_tokens) > 1 else ""
        parts.append(
            f'<div class="wsd-pair">{title}<div><h4>raises</h4>{_token_table(side["top"], "pos")}</div>'
            f'<div><h4>lowers</h4>{_token_table(side["bottom"], "neg")}</div></div>'
        )
    return "".join(parts)


def _stat(name: str, value: str) -> str:
    return f"<div><dt>{escape(name)}</dt><dd>{value}</dd></div>"


def _horizon(record: AtomRecord) -> str:
    if record.horizon is None:
        return "–"
    max_horizon = len(record.horizons.counts) - 1  # the last bin holds "longer than max_horizon"
    return f"&gt; {max_horizon}" if record.horizon > max_horizon else f"{record.horizon} tokens"


def _runs(record: AtomRecord) -> str:
    rows = []
    sub = record.runs.get("substitution")
    if sub:
        rows.append(_stat("substitution win rate", f'{percent(sub["win_rate"])} of {sub["n"]} firings'))
        rows.append(_stat("atom < delete < random", percent(sub["strict_chain_rate"])))
        if sub.get("class"):
            rows.append(_stat("class in the run", escape(sub["class"])))
    shift = record.runs.get("logit_shift")
    if shift:
        rows.append(_stat("logit-shift R², exact first order", number(shift["r2_exact"])))
        rows.append(_stat("logit-shift R², the paper's formula", number(shift["r2_paper"])))
    if not rows:
        return ""
    return f'<div class="wsd-panel"><h3>Protocol runs</h3><dl class="wsd-stats">{"".join(rows)}</dl></div>'


def _response(record: AtomRecord) -> str:
    response = record.response
    if not response:
        return (
            '<div class="wsd-panel wsd-wide"><h3>Exact linear response</h3><p class="wsd-note">Not computed for this '
            "atom (the dashboard computes it for the most frequent atoms: DashboardConfig.response_atoms, "
            "or none with linear_response=False).</p></div>"
        )
    rows = "".join(
        f'<tr><td class="num">+{offset}</td><td class="num">{number(peak)}</td><td>'
        + " ".join(f'<span class="wsd-chip">{token_text(t)} <b>{v:+.3g}</b></span>' for t, v in tokens)
        + "</td></tr>"
        for offset, peak, tokens in zip(response["offsets"], response["max_abs"], response["tokens"])
    )
    return (
        '<div class="wsd-panel wsd-wide"><h3>Exact linear response</h3>'
        f'<p class="wsd-note">{escape(response["note"])}</p>'
        f'<table class="wsd-response"><tr><th>position</th><th>max |Δlogit|</th><th>tokens moved most</th></tr>{rows}</table></div>'
    )


def atom_page(record: AtomRecord) -> str:
    """One atom's page: statistics, histograms, factor readouts, contexts, runs, linear response."""
    badge = f' <span class="wsd-badge {record.cosine_class}">{record.cosine_class}</span>' if record.cosine_class else ""
    stats = "".join([
        _stat("frequency", percent(record.frequency)),
        _stat("firings", str(record.count)),
        _stat("mean activation", number(record.mean_activation)),
        _stat("max activation", number(record.max_activation)),
        _stat("median cos to write", number(record.median_cosine)),
        _stat("gate half-life", _horizon(record)),
    ])
    act, cos, hor, logit = record.activations, record.cosines, record.horizons, record.logit_effects
    return (
        f'<section class="wsd-atom" data-atom="{record.index}"><h2>Atom {record.index}{badge}</h2>'
        f'<dl class="wsd-stats">{stats}</dl><div class="wsd-grid">'
        f'<div class="wsd-panel"><h3>Activations</h3>{bar_chart(act.counts, act.edges, label="code at firings")}</div>'
        f'<div class="wsd-panel"><h3>Value factor: what a read writes toward</h3>{_value_tokens(record)}'
        f'{bar_chart(logit.counts, logit.edges, label="logit effect over the vocabulary", color="#4a78b5")}</div>'
        f'<div class="wsd-panel"><h3>Cosine to the native write</h3>'
        f'{bar_chart(cos.counts, cos.edges, label="Frobenius cosine at firings", color="#3a9a5b")}</div>'
        f'<div class="wsd-panel"><h3>Decay horizon</h3>'
        f'{bar_chart(hor.counts, hor.edges, label="gate half-life after firing (tokens)", color="#8a5bb5", ends=("1", f"> {len(hor.counts) - 1}"))}</div>'
        f"{_runs(record)}</div>"
        f'<div class="wsd-panel wsd-wide"><h3>Top activations</h3>{_contexts(record.contexts, "no firing")}</div>'
        f'<div class="wsd-panel wsd-wide"><h3>Key factor: the queries that retrieve it most</h3>'
        f'<p class="wsd-note">|A<sup>T</sup>q<sub>t</sub>|: how much of the atom a read at each token takes out of the state.</p>'
        f'{_contexts(record.queries, "no query")}</div>'
        f"{_response(record)}</section>"
    )


# (column title, data key, how the value is shown, sort as text)
_COLUMNS = [
    ("atom", "index", lambda r: f'<a href="#atom-{r.index}">{r.index}</a>'),
    ("frequency", "frequency", lambda r: percent(r.frequency)),
    ("mean act.", "mean", lambda r: number(r.mean_activation)),
    ("max act.", "max", lambda r: number(r.max_activation)),
    ("median cos", "cosine", lambda r: number(r.median_cosine)),
    ("class", "class", lambda r: r.cosine_class or "–"),
    ("half-life", "horizon", lambda r: "–" if r.horizon is None else str(r.horizon)),
    ("subst. win", "win", lambda r: percent(r.runs["substitution"]["win_rate"]) if "substitution" in r.runs else "–"),
    ("logit R²", "r2", lambda r: number(r.runs["logit_shift"]["r2_exact"]) if "logit_shift" in r.runs else "–"),
]


def _sort_keys(r: AtomRecord) -> dict[str, Any]:
    sub, shift = r.runs.get("substitution"), r.runs.get("logit_shift")
    return {
        "index": r.index, "frequency": r.frequency, "mean": r.mean_activation, "max": r.max_activation,
        "cosine": r.median_cosine, "class": r.cosine_class, "horizon": r.horizon,
        "win": sub["win_rate"] if sub else None, "r2": shift["r2_exact"] if shift else None,
    }


def atom_list(data: DashboardData, limit: int | None = None) -> str:
    """The table of alive atoms, most frequent first (``limit`` rows at most), sortable in the page."""
    records = sorted(data.atoms, key=lambda r: (-r.frequency, r.index))
    shown = records if limit is None else records[:limit]
    head = "".join(
        f'<th data-key="{key}"{" data-text" if key == "class" else ""}>{escape(title)}</th>' for title, key, _ in _COLUMNS
    )
    head += "<th>fires hardest on</th><th>writes toward</th>"
    rows = []
    for r in shown:
        keys = " ".join(f'data-{k}="{"" if v is None else v}"' for k, v in _sort_keys(r).items())
        cells = "".join(f"<td>{show(r)}</td>" for _, _, show in _COLUMNS)
        fires = " ".join(f'<span class="wsd-chip">{token_text(c.tokens[c.center])}</span>' for c in r.contexts[:3])
        writes = " ".join(f'<span class="wsd-chip">{token_text(t)}</span>' for t, _ in r.value_tokens[0]["top"][:3])
        rows.append(f'<tr data-atom="{r.index}" {keys}>{cells}<td>{fires}</td><td>{writes}</td></tr>')
    more = f'<p class="wsd-note">{len(records) - len(shown)} more atoms in the full dashboard.</p>' if len(shown) < len(records) else ""
    return f'<table class="wsd-list"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'


def summary(meta: dict[str, Any]) -> str:
    """The header line: which SAE, on what, how much text, how many atoms alive."""
    return (
        f'<p class="wsd-summary"><b>{escape(str(meta["sae"]))}</b> on {escape(str(meta["model"]))}, '
        f'{escape(meta["hook"])} head {meta["head"]} ({meta["kind"]}s); '
        f'{meta["n_alive"]} of {meta["d_sae"]} atoms fired over {meta["n_positions"]:,} positions of '
        f'{escape(str(meta["source"]))} ({meta["n_sequences"]} × {meta["seq_len"]} tokens).</p>'
    )
