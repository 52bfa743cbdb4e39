"""Results as a markdown table + JSON, precision-recall curves and retrieval-example grids (PNG)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .protocols import Protocol
from .runner import Row

# Columns per protocol in the markdown table (metric key, header).
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "P1": (("mAP", "P1 mAP"), ("mAP@20", "mAP@20"), ("recall@1", "R@1"), ("recall@5", "R@5"), ("recall@10", "R@10")),
    "P3": (("mAP", "P3 mAP"), ("recall@1", "R@1")),
    "CD": (("mAP", "CD mAP"), ("mAP@20", "mAP@20"), ("recall@1", "R@1")),
}
DEFAULT_COLUMNS = (("mAP", "mAP"), ("mAP@20", "mAP@20"), ("recall@1", "R@1"))


def markdown_table(rows: Sequence[Row], protocols: Sequence[str]) -> str:
    head = ["method", "backbone"]
    for p in protocols:
        cols = COLUMNS.get(p, DEFAULT_COLUMNS)
        head += [h if p in COLUMNS else f"{p} {h}" for _, h in cols]
    head += ["dim", "ms/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, r.backbone]
        for p in protocols:
            res = r.results.get(p)
            for key, _ in COLUMNS.get(p, DEFAULT_COLUMNS):
                cells.append(f"{res[key]:.3f}" if res else "-")
        cells += [str(r.dim), f"{r.ms_per_image:.0f}" if r.ms_per_image is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(rows: Sequence[Row], protocols: dict[str, Protocol], path: Path, extra: dict | None = None) -> None:
    payload = {
        **(extra or {}),
        "protocols": {n: {"description": p.description, "queries": len(p.queries), "database": len(p.database),
                          "fit": len(p.fit)} for n, p in protocols.items()},
        "rows": [r.to_json() for r in rows],
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")


def plot_pr(rows: Sequence[Row], protocols: Sequence[str], path: Path, max_rows: int = 12) -> None:
    """One panel per protocol: mean interpolated precision vs recall, one line per row (best mAP first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p in protocols if any(p in r.curves for r in rows)]
    cmap = plt.get_cmap("tab20")
    color = {id(r): cmap(i % 20) for i, r in enumerate(rows)}  # one colour per row in every panel
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False, dpi=80)
    for ax, p in zip(axes[0], names, strict=True):
        ranked = sorted((r for r in rows if p in r.curves), key=lambda r: -r.results[p]["mAP"])[:max_rows]
        for r in ranked:
            prec = np.asarray(r.curves[p])
            ax.plot(np.linspace(0, 1, len(prec)), prec, lw=1.2, color=color[id(r)],
                    label=f"{r.name} {r.backbone.split('@')[0].replace('efficientnet_', '')} ({r.results[p]['mAP']:.2f})")
        ax.set_title(f"{p}: precision-recall", fontsize=10)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision (interpolated, mean)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def example_grid(row: Row, protocol: Protocol, path: Path, thumb: int = 72, colors: int = 96) -> None:
    """Rows of query + top-5 results: query framed blue, correct results green, wrong ones red."""
    from PIL import Image, ImageDraw

    examples = row.examples.get(protocol.name, [])
    if not examples:
        return
    pad, label_h, k = 4, 12, max(len(t) for _, t in examples)
    cell = thumb + 2 * pad
    title_h = 16
    grid = Image.new("RGB", (cell * (k + 1) + pad, title_h + len(examples) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 2), f"{row.name} on {row.backbone} - {protocol.name}: query | top {k} (green = same product)",
              fill="black")

    def tile(photo_path: Path, x: int, y: int, color: str, text: str) -> None:
        with Image.open(photo_path) as im:
            im = im.convert("RGB")
            im.thumbnail((thumb, thumb))
            bg = Image.new("RGB", (thumb, thumb), "white")
            bg.paste(im, ((thumb - im.width) // 2, (thumb - im.height) // 2))
        draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=color)
        grid.paste(bg, (x + pad - 1, y + pad - 1))
        draw.text((x + 1, y + cell - 1), text[:14], fill="black")

    for r, (qi, top) in enumerate(examples):
        y = title_h + r * (cell + label_h)
        q = protocol.queries[qi]
        tile(q.path, pad // 2, y, "#1f5fbf", q.fine_name)
        pos = protocol.positives(q)
        for c, j in enumerate(top):
            d = protocol.database[j]
            tile(d.path, pad // 2 + (c + 1) * cell, y, "#1a9e3a" if j in pos else "#d62728", d.fine_name)
    grid.convert("P", palette=Image.Palette.ADAPTIVE, colors=colors).save(path, optimize=True)


def write_report(rows: Sequence[Row], protocols: dict[str, Protocol], out: Path, command: str = "",
                 examples_for: int = 0, extra: dict | None = None) -> list[Path]:
    """results.md, results.json, pr_curves.png and examples-<protocol>.png (for row `examples_for`) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(protocols)
    md = out / "results.md"
    text = (f"`{command}`\n\n" if command else "") + markdown_table(rows, names)
    text += "\n" + "\n".join(f"- {n}: {p.description}; {len(p.queries)} queries, {len(p.database)} database images"
                             for n, p in protocols.items()) + "\n"
    md.write_text(text)
    js = out / "results.json"
    write_json(rows, protocols, js, {"command": command, **(extra or {})})
    written = [md, js]
    if rows:
        pr = out / "pr_curves.png"
        plot_pr(rows, names, pr)
        written.append(pr)
        row = rows[min(examples_for, len(rows) - 1)]
        for n, p in protocols.items():
            g = out / f"examples-{n}.png"
            example_grid(row, p, g)
            if g.exists():
                written.append(g)
    return written


def rows_from_json(path: Path) -> list[Row]:
    """The rows of a results.json (metrics and settings; not the curves or examples)."""
    data = json.loads(Path(path).read_text())
    rows = []
    for r in data["rows"]:
        row = Row(r["name"], r["backbone"], results=r["results"], dim=r["dim"], ms_per_image=r["ms_per_image"],
                  ms_note=r.get("ms_note", ""), hp=r.get("hp", {}), selection=r.get("selection", []),
                  params=r.get("params", {}), onnx=r.get("onnx", {}), seconds=r.get("seconds", 0.0))
        rows.append(row)
    return rows
