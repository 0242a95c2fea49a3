"""The evaluation report: pivots of probe rows, alignment results, markdown and atomic files."""

import json

from gair_model.eval.report import (
    alignment_results,
    build_evaluation,
    downstream_results,
    probe_scores_figure,
    render_ablation_markdown,
    render_markdown,
    write_report,
)


def _row(task, method, probe, metrics, type_="regression", family="location"):
    return {"task": task, "family": family, "encoder": "location", "type": type_, "target": "t", "method": method,
            "probe": probe, "n_train": 80, "n_test": 20, "n_skipped_inputs": 0, "metrics": metrics, "alpha": 1.0,
            "seed": 42, "wall_s": 0.5, "checkpoint": "ckpt.safetensors" if method == "gair" else None, "note": ""}


ROWS = [
    _row("temp", "gair", "ridge", {"r2": 0.5, "mae": 2.0}),
    _row("temp", "random_init", "ridge", {"r2": 0.1, "mae": 4.0}),
    _row("temp", "geoclip_pretrained", "ridge", {"r2": 0.8, "mae": 1.0}),
    _row("temp", "gair", "knn", {"r2": 0.4, "mae": 2.5}),
    _row("city", "gair", "ridge", {"accuracy": 0.7, "macro_f1": 0.6}, "classification", "streetview"),
    _row("city", "random_init", "ridge", {"accuracy": 0.3, "macro_f1": float("nan")}, "classification", "streetview"),
    {"task": "scenes", "family": "remote_sensing", "skipped": "data absent: /nowhere/rsscn7"},
]


def _bench(r1, err_m, centre_m):
    return {"n_samples": 50, "n_tiles": 5, "localizer": "nili", "wall_s": 1.0,
            "retrieval": {"sv_to_rs": {"n": 50, "recall@1": r1, "recall@5": 0.5, "recall@10": 0.7,
                                       "median_rank": 6, "tile_hit@1": 0.6, "chance_recall@1": 0.02,
                                       "tile_chance@1": 0.2},
                          "rs_to_sv": {"recall@1": r1 / 2}, "sv_to_loc": {"recall@1": 0.1, "median_error_km": 2.5}},
            "localisation": {"grid": 48, "model": {"median_m": err_m, "p90_m": 2 * err_m, "median_px": err_m / 10,
                                                   "within_cell": 0.3},
                             "centre_baseline": {"median_m": centre_m, "within_cell": 0.1}},
            "rings": [{"ring": 0, "lo": 0.0, "hi": 0.1, "n": 10, "empty": False,
                       "model": {"median_m": err_m, "within_cell": 0.5}, "centre_baseline": {"median_m": 50.0},
                       "sv_to_rs_recall@1": 0.4}]}


def test_downstream_results_pivot_methods_into_baselines():
    res = downstream_results(ROWS)
    temp_r2 = next(r for r in res if r["task"] == "temp" and r["probe"] == "ridge" and r["metric"] == "r2")
    assert temp_r2["value"] == 0.5
    assert temp_r2["baselines"] == {"random_init": 0.1, "geoclip_pretrained": 0.8}
    assert temp_r2["checkpoint"] == "ckpt.safetensors" and temp_r2["n_test"] == 20 and temp_r2["seed"] == 42
    assert temp_r2["wall_s"] == 1.5  # every method of the task and probe
    knn = [r for r in res if r["task"] == "temp" and r["probe"] == "knn"]
    assert {r["metric"] for r in knn} == {"r2", "mae"} and all(r["baselines"] == {} for r in knn)
    f1 = next(r for r in res if r["task"] == "city" and r["metric"] == "macro_f1")
    assert f1["value"] == 0.6 and f1["baselines"]["random_init"] is None  # NaN is not valid JSON: None
    assert not any(r["task"] == "scenes" for r in res)


def test_alignment_results_compare_model_with_random_and_centre():
    res = alignment_results({"trained": _bench(0.4, 100.0, 300.0), "random_init": _bench(0.02, 310.0, 300.0)},
                            checkpoint="c")
    loc = next(r for r in res if r["task"] == "alignment/in_tile_localisation" and r["metric"] == "median_m")
    assert loc["value"] == 100.0 and loc["baselines"] == {"random_init": 310.0, "tile_centre": 300.0}
    r1 = next(r for r in res if r["task"] == "alignment/sv_to_rs" and r["metric"] == "recall@1")
    assert r1["value"] == 0.4 and r1["baselines"] == {"random_init": 0.02, "chance": 0.02} and r1["checkpoint"] == "c"
    rank = next(r for r in res if r["task"] == "alignment/sv_to_rs" and r["metric"] == "median_rank")
    assert rank["baselines"]["chance"] == 25.5  # (n + 1) / 2 of 50 gallery items
    r10 = next(r for r in res if r["task"] == "alignment/sv_to_rs" and r["metric"] == "recall@10")
    assert r10["baselines"]["chance"] == 0.2
    assert alignment_results({}) == []


def test_report_files_hold_every_task_and_baseline(tmp_path):
    ablation = {"budget": {"steps": 3, "batch_size": 8},
                "runs": {"nili": {"final_loss": 9.0, "benchmark": _bench(0.3, 90.0, 300.0)},
                         "mean": {"final_loss": 9.5, "benchmark": _bench(0.1, 300.0, 300.0)}}}
    ev = build_evaluation(checkpoint="c.safetensors", step=3, model_config={"localizer": "nili"},
                          alignment={"trained": _bench(0.4, 100.0, 300.0), "random_init": _bench(0.02, 310.0, 300.0)},
                          downstream_rows=ROWS, ablation=ablation, training={"final_loss": 9.1, "final_val_loss": 9.3},
                          synthetic_data=True, notes=["RGB mapped to B04/B03/B02"], wall_s={"alignment": 1.0})
    written = write_report(tmp_path, ev, {"probe_scores": probe_scores_figure(ev["results"]), "none": None})
    doc = json.loads(written["json"].read_text())
    assert doc["skipped"] == [{"task": "scenes", "family": "remote_sensing", "method": None,
                              "reason": "data absent: /nowhere/rsscn7"}]
    assert doc["seeds"] == {"probe_split": [42]} and doc["checkpoint"] == "c.safetensors"
    assert {r["task"] for r in doc["results"]} >= {"temp", "city", "alignment/sv_to_rs"}
    md = written["md"].read_text()
    for text in ("Synthetic data", "geoclip_pretrained", "random_init", "| temp |", "data absent: /nowhere/rsscn7",
                 "evaluation_probe_scores.png", "RGB mapped", "| nili |", "| mean |", "steps = 3"):
        assert text in md, text
    assert written["probe_scores"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json", "evaluation.md",
                                                          "evaluation_probe_scores.png"]  # no temp file left


def test_headline_picks_the_best_baseline_in_the_right_direction():

    ev = build_evaluation(checkpoint="c", step=1, model_config={},
                          alignment={"trained": _bench(0.4, 100.0, 300.0), "random_init": _bench(0.02, 310.0, 300.0)},
                          downstream_rows=ROWS)
    heads = {(h["task"], h["metric"]): h for h in ev["headline"]}
    loc = heads[("alignment/in_tile_localisation", "median_m")]  # lower is better
    assert loc["best_baseline"] == "tile_centre" and loc["model_better"] is True
    temp = heads[("temp", "r2")]  # higher is better: GeoCLIP's 0.8 beats the model's 0.5
    assert temp["best_baseline"] == "geoclip_pretrained" and temp["model_better"] is False
    assert ("temp", "mae") not in heads and ("alignment/sv_to_rs", "recall@5") not in heads
    assert "beats its best baseline on" in render_markdown(ev)


def test_markdown_without_inputs_says_what_did_not_run():
    md = render_markdown(build_evaluation(checkpoint=None, step=None, model_config=None))
    assert "Geo-alignment benchmark not run" in md and "No downstream task ran" in md
    assert "ablate_localizers" in md
    assert probe_scores_figure([]) is None
    assert "equal budget" in render_ablation_markdown({"budget": {}, "runs": {}}, plot="p.png")
