"""The match decision chosen on the catalog the mesh stores, not on whole images.

    python -m bench.match_eval --model model_repository --out runs/match [--smoke] [--write-params]
    python -m bench.match_eval --model model_repository --out runs/match --from-hits   # choose again, no model runs
    python -m bench.match_eval --model REPO --select-on TF --out DIR   # select on TF (a model trained on split far)

`SearchHit.match` says the system is sure a hit shows the same product. Its threshold on the fused
score was chosen by bench.verify_eval on whole images (one object per photo); the mesh stores each
photo's full frame and up to 3 detected objects, whose neighbouring products verify against a query
more easily. This run scores the mesh's exact path offline (bench.meshpath: the services' own
models and decisions, the defaults of the gateway, the worker and the re-rank service) and chooses
the threshold on it:

- Selection: **TH-mesh**, held-out train photos of the products -> the other train photos, ingested
  as the mesh does, and **TH-absent**, the same queries with their own product's photos left out of
  the catalog: a query whose product is not there, where the top hit is the nearest other product
  (a sibling in the same packaging, most often) and must not be flagged. The pairs a threshold is
  chosen on are the top hits of both, half of them wrong by construction; pairs over each query's
  top 20 were tried first and do not work here: a product has about 80 train photos, so a TH
  query's top 20 are nearly all right and any threshold keeps them 95 % right (it chose 0.56,
  which would flag nearly every top hit). For each rule, the lowest threshold at which the top
  hits it flags are right >= 95 % of the time (bench.verify_eval.pick_threshold); of the rules, the
  one that flags more of TH-mesh's top hits at its threshold. `--select-on TF` builds the same two
  from TF (each product's train photos least like the rest, visearch.evaluation.farsplit) for a
  model trained on the `far` split, which never saw them.
- Rules (visearch.local.match_scores; a match is always a verified hit): `fused`, the fused score
  after the expansion (the rule served until stop 37); `evidence`, the hit's own global similarity
  plus the same verification bonus, without the expansion; `similarity`, the global similarity
  alone.
- Reported once, never selected on: **P1** (val photos of the products -> the train photos), the
  share of queries whose top hit is flagged (coverage) and how often a flagged top hit is right
  (precision), beside the served threshold's.

Writes result.json, result.md and curve.png (top-1 precision against coverage as the threshold
moves, the chosen points marked) into --out; with --write-params the chosen threshold into
`<served embedder version>/verify.json`, which the re-rank service reads for that model's catalogs.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import write_result
from bench.meshpath import Hit, MeshPath
from bench.policy_eval import smoke_catalog
from bench.verify_eval import pick_threshold
from visearch import datasets, local
from visearch.demo import item_id
from visearch.evaluation.protocols import get_protocols
from visearch.inference import resolve_version
from visearch.metrics import retrieval_report
from visearch.settings import GatewaySettings

TARGET = 0.95
RULES = ("fused", "evidence", "similarity")  # visearch.local.match_scores, on verified hits
REPORTED = "P1"


def _bonus(w: float, cap: int):
    return lambda hits: hits[0].similarity + w * min(hits[0].inliers, cap) / cap


def _plus(w: float, feature):
    return lambda hits: hits[0].similarity + w * feature(hits[0])


def _background(a: float):
    """The evidence score less a share of the lowest similarity among the query's candidates (a
    query whose every similarity is low, another light or face of the package, is judged against its
    own floor). The hits come in re-ranked order, so the floor is their minimum, not the last one."""
    evidence = _bonus(0.1, 40)
    return lambda hits: evidence(hits) - a * min(h.similarity for h in hits)


# Other forms of the decision, measured beside RULES (`families`), never served: a stronger or longer
# verification bonus, the share of tentative matches that are inliers, the inliers' hull, and the
# query's own floor. Fixed before any reported row was read.
FAMILIES = {
    **{f"similarity + {w} x min(inliers, {cap})/{cap}": _bonus(w, cap) for w in (0.1, 0.2, 0.3, 0.5)
       for cap in (40, 80, 150)},
    **{f"similarity + {w} x inliers/matches": _plus(w, lambda h: h.inliers / max(h.matches, 1)) for w in (0.1, 0.3, 0.5)},
    **{f"similarity + {w} x hull coverage": _plus(w, lambda h: min(h.coverage, 1.0)) for w in (0.1, 0.3, 0.5)},
    **{f"evidence - {a} x the lowest of its 100 candidates' similarities": _background(a) for a in (0.25, 0.5)},
}


def selection_names(select_on: str) -> tuple[str, str]:
    """The two selection protocols built from a train hold-out: its queries against the catalog, and
    against the catalog without their own product."""
    return f"{select_on}-mesh", f"{select_on}-absent"


def selection_of(runs: dict) -> tuple[str, str]:
    """The selection protocols of a run's hits (`<hold-out>-mesh`, `<hold-out>-absent`)."""
    sel = [k for k in runs if k.endswith("-mesh")]
    absent = [k for k in runs if k.endswith("-absent")]
    if len(sel) != 1 or len(absent) != 1:
        raise ValueError(f"hits of {sorted(runs)}: expected one <hold-out>-mesh and one <hold-out>-absent")
    return sel[0], absent[0]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def match_score(hit: Hit, rule: str, params: local.VerifyParams) -> float:
    """The hit's score under a rule, as visearch.local.match_scores computes it in the re-rank service."""
    evidence = np.float32(min(hit.inliers, params.cap) / params.cap if hit.verified else 0.0)
    return float(local.match_scores(np.float32([hit.similarity]), np.float32([hit.score]), np.array([evidence]),
                                    replace(params, match_on=rule))[0])


Score = Callable[[list[Hit]], float]  # a query's hits -> its top hit's match score


def rule_score(rule: str, params: local.VerifyParams) -> Score:
    return lambda hits: match_score(hits[0], rule, params)


def pairs(runs: list[tuple[int, list[Hit]]], fine: dict[str, int], score: Score) -> list[tuple[float, bool]]:
    """(match score, right) of the verified top hits."""
    return [(score(hits), fine[hits[0].item_id] == q) for q, hits in runs if hits and hits[0].verified]


def top1(runs: list[tuple[int, list[Hit]]], fine: dict[str, int], score: Score, t: float) -> dict:
    """The share of queries whose top hit is flagged (verified, score >= t) and how often it is right."""
    right = [y for s, y in pairs(runs, fine, score) if s >= t]
    return {"coverage": len(right) / max(1, len(runs)), "precision": float(np.mean(right)) if right else float("nan"),
            "flagged": len(right)}


async def collect(model: Path, smoke: bool, select_on: str = "TH") -> tuple[dict, dict[str, int]]:
    """Each protocol's (query product, re-ranked hits) through the mesh path; item id -> product."""
    root = datasets.grocery_root()
    if root is None:
        raise SystemExit("the Grocery Store dataset is not at ../shared/data/grocery-store")
    train, val = datasets.grocery_split(root, "train"), datasets.grocery_split(root, "val")
    sel_name, absent_name = selection_names(select_on)
    hold = get_protocols(root, (select_on,))[select_on]
    queries = {sel_name: hold.queries, REPORTED: [p for p in val if p.is_product]}
    catalog = train
    if smoke:
        queries = {k: v[::40][:4] for k, v in queries.items()}
        catalog = smoke_catalog(queries[sel_name] + queries[REPORTED], train)
    fine = {item_id(p): p.fine_id for p in catalog}
    gw = GatewaySettings.model_fields
    margins = (gw["query_crop_margin"].default, gw["catalog_crop_margin"].default)
    mp = MeshPath(model, "detected+full", 3, "both", "verify")
    try:
        t0 = time.monotonic()
        log(f"ingesting {len(catalog)} train photos as the mesh does")
        await mp.ingest(catalog)
        log(f"  {time.monotonic() - t0:.0f}s")
        hold_items = {item_id(p) for p in hold.database} & fine.keys()
        selection = mp.subset(hold_items)
        absent = {f: mp.subset({i for i in hold_items if fine[i] != f}) for f in {q.fine_id for q in queries[sel_name]}}
        runs = {sel_name: [], absent_name: [], REPORTED: []}
        for name, qs in queries.items():
            for n, q in enumerate(qs):
                prepared = await mp.prepare(q.path)
                if name == sel_name:
                    runs[sel_name].append((q.fine_id, selection.hits(prepared, 100, *margins)))
                    runs[absent_name].append((q.fine_id, absent[q.fine_id].hits(prepared, 100, *margins)))
                else:
                    runs[name].append((q.fine_id, mp.hits(prepared, 100, *margins)))
                if n % 50 == 0:
                    log(f"  {name}: {n + 1}/{len(qs)} queries")
    finally:
        await mp.close()
    return runs, fine


def evaluate(runs: dict, fine: dict[str, int], params: local.VerifyParams) -> dict:
    """Each rule's threshold on the selection's top hits, the rule chosen, and every protocol's row
    for the served decision (`params`) and each rule at its threshold."""
    sel_name, absent_name = selection_of(runs)
    result: dict = {"served": {"rule": params.match_on, "threshold": params.threshold}, "rules": {}, "rows": []}
    for rule in RULES:
        score = rule_score(rule, params)
        t, _ = pick_threshold(pairs(runs[sel_name] + runs[absent_name], fine, score), TARGET)
        result["rules"][rule] = {"threshold": t, **{f"selection_top1_{k}": v
                                                    for k, v in top1(runs[sel_name], fine, score, t).items()}}
    chosen = max(RULES, key=lambda r: result["rules"][r]["selection_top1_coverage"])
    result["chosen"] = {"rule": chosen, "threshold": result["rules"][chosen]["threshold"],
                        "selected_on": f"{sel_name} + {absent_name}"}
    decisions = [(f"served ({params.match_on})", params.match_on, params.threshold)]
    decisions += [(f"{x} (chosen)" if x == chosen else x, x, result["rules"][x]["threshold"]) for x in RULES]
    for name, r in runs.items():
        rankings = [[h.item_id for h in hits] for _, hits in r]
        positives = [{i for i, f in fine.items() if f == q} for q, _ in r]
        # The absent protocol has no right hit: its flagged share is its false matches, it has no ranking quality.
        quality = retrieval_report(rankings, positives) if name != absent_name else {"mAP@20": np.nan, "recall@1": np.nan}
        for label, rule, t in decisions:
            result["rows"].append({"protocol": name, "rule": label, "threshold": t, "mAP@20": quality["mAP@20"],
                                   "R@1": quality["recall@1"], **top1(r, fine, rule_score(rule, params), t)})
    return result


def families(runs: dict, fine: dict[str, int]) -> list[dict]:
    """Each form in FAMILIES with its threshold chosen as the rules' are (the selection's top hits
    right >= TARGET above it), its selection coverage and false matches, and the reported protocol's
    coverage and precision at that threshold; best on the selection first."""
    sel_name, absent_name = selection_of(runs)
    rows = []
    for name, form in FAMILIES.items():
        def score(hits, form=form):  # float32, as the re-rank service's scores are
            return float(np.float32(form(hits)))

        t, _ = pick_threshold(pairs(runs[sel_name] + runs[absent_name], fine, score), TARGET)
        row = {"form": name, "threshold": t, "selection_coverage": top1(runs[sel_name], fine, score, t)["coverage"],
               "absent_flagged": top1(runs[absent_name], fine, score, t)["coverage"]}
        if REPORTED in runs:
            reported = top1(runs[REPORTED], fine, score, t)
            row["reported_coverage"], row["reported_precision"] = reported["coverage"], reported["precision"]
        rows.append(row)
    return sorted(rows, key=lambda r: -r["selection_coverage"])


def draw(runs: dict, fine: dict[str, int], result: dict, params: local.VerifyParams, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel_name, absent_name = selection_of(runs)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    panels = ((f"{sel_name} + {absent_name} (selection)", runs[sel_name] + runs[absent_name]),
              (f"{REPORTED} (reported)", runs[REPORTED]))
    for ax, (title, r) in zip(axes, panels, strict=True):
        for rule, style in zip(RULES, ("-", "--", ":"), strict=True):
            ts = sorted({match_score(hits[0], rule, params) for _, hits in r if hits and hits[0].verified}, reverse=True)
            pts = [p for p in (top1(r, fine, rule_score(rule, params), t) for t in ts) if p["flagged"]]
            ax.plot([p["coverage"] for p in pts], [p["precision"] for p in pts], style, label=f"{rule} >= t")
            c = top1(r, fine, rule_score(rule, params), result["rules"][rule]["threshold"])
            ax.plot([c["coverage"]], [c["precision"]], "o", color=ax.lines[-1].get_color())
        s = top1(r, fine, rule_score(params.match_on, params), params.threshold)
        ax.plot([s["coverage"]], [s["precision"]], "kx", label=f"served: {params.match_on} >= {params.threshold:.4f}")
        ax.axhline(TARGET, color="grey", lw=0.5)
        ax.set_title(f"top hits: {title}", fontsize=9)
        ax.set_xlabel("share of queries whose top hit is a match")
    axes[0].set_ylabel("precision of a matched top hit")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("model_repository"))
    ap.add_argument("--out", type=Path, default=Path("runs/match"))
    ap.add_argument("--smoke", action="store_true", help="a few queries and a small catalog (CI)")
    ap.add_argument("--from-hits", action="store_true", help="choose again from --out's hits.pkl (no model runs)")
    ap.add_argument("--write-params", action="store_true", help="write the choice into <served version>/verify.json")
    ap.add_argument("--select-on", choices=("TH", "TF"), default="TH",
                    help="the train hold-out the selection is built from (TF: for a model trained on split far)")
    args = ap.parse_args(argv)
    vdir = args.model / "embedder" / resolve_version(args.model / "embedder", "")
    params = local.VerifyParams.load(vdir / "verify.json")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_hits:
        with open(args.out / "hits.pkl", "rb") as f:
            saved = pickle.load(f)
        runs, fine = saved["runs"], saved["fine"]
        if selection_of(runs) != selection_names(args.select_on):
            raise SystemExit(f"{args.out / 'hits.pkl'} holds the hits of {' + '.join(selection_of(runs))}, "
                             f"not of --select-on {args.select_on}")
    else:
        runs, fine = asyncio.run(collect(args.model, args.smoke, args.select_on))
        with open(args.out / "hits.pkl", "wb") as f:  # every query's hits: --from-hits chooses again from them
            pickle.dump({"runs": runs, "fine": fine}, f)
    result = evaluate(runs, fine, params)
    result["model"] = str(vdir)
    result["families"] = families(runs, fine)
    md = ["| protocol | rule | threshold | mAP@20 | R@1 | top-1 flagged | precision of a flagged top-1 |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        md.append(f"| {r['protocol']} | {r['rule']} | {r['threshold']:.4f} | {r['mAP@20']:.3f} | {r['R@1']:.2f} | "
                  f"{r['coverage']:.2f} | {r['precision']:.3f} |")
    md += ["", f"Other forms of the decision (never served), each thresholded on {' + '.join(selection_of(runs))}:", "",
           f"| form | threshold | selection top-1 flagged | absent flagged | {REPORTED} flagged | {REPORTED} precision |",
           "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['form']} | {r['threshold']:.4f} | {r['selection_coverage']:.3f} | {r['absent_flagged']:.3f} | "
           f"{r.get('reported_coverage', float('nan')):.2f} | {r.get('reported_precision', float('nan')):.3f} |"
           for r in result["families"]]
    write_result(args.out, result, "\n".join(md) + "\n")
    draw(runs, fine, result, params, args.out / "curve.png")
    if args.write_params:
        replace(params, threshold=result["chosen"]["threshold"], match_on=result["chosen"]["rule"],
                selected_on=f"{' + '.join(selection_of(runs))} (bench.match_eval)").write(vdir / "verify.json")
        log(f"wrote {vdir / 'verify.json'}")
    print("\n".join(md))


if __name__ == "__main__":
    main()
