"""var/demo/summary.json (issue 17): typed numbers and nested objects, versioned; the table is rendered from it."""

from __future__ import annotations

import json
from pathlib import Path

from infra.local.demo_report import DemoResult, DemoSummary, Timings, what_next


def result(**changes) -> DemoResult:
    fields = dict(
        stamp="20261205-120000", artifact="s3://ramplus/models/demo/v1", metrics={"final": {
            "val_map": 0.7412, "prior_map": 0.3401,
            "val_tag_ap": {"red": 1.0, "blue": 0.9, "circle": 0.8, "ring": None, "bar": 0.6, "white background": 1.0}}},
        trained=True, results=[{"id": "a", "vocab": "demo@1"}, {"id": "b", "vocab": "demo@2"}, {"id": "b", "vocab": "demo@2"}],
        backfilled=[], official=[], checkpoint=None, dead_letters=[{"error": {"kind": "not_found"}}, {"error": {"kind": "forbidden"}}],
        switched=True, backfill={"images_tagged": 125, "errors": {"decode": 2, "fetch": 1}, "images_skipped": 0}, requests=5,
    )
    return DemoResult(**{**fields, **changes})


def test_the_summary_holds_numbers_a_script_can_check():
    timings = Timings({"stack": 8.04, "stream": 24.46})
    data = json.loads(DemoSummary.of(result(), timings, 32.5).model_dump_json())
    assert data["schema_version"] == 2
    assert data["model"] == {"artifact": "s3://ramplus/models/demo/v1", "trained_now": True, "held_out_map": 0.7412, "label_prior_map": 0.3401,
                             "held_out_ap_by_group": {"colour": 0.95, "shape": 0.7, "background": 1.0}}  # over tags with an AP
    assert data["stream"] == {"requests": 5, "distinct_results": 2, "duplicates": 1, "dead_letters_by_kind": {"forbidden": 1, "not_found": 1},
                              "results_per_vocabulary": {"demo@1": 1, "demo@2": 2}, "every_replica_on_demo_2": True}
    assert data["backfill"] == {"tagged": 125, "errors": 3, "skipped": 0}
    assert data["photos_tagged_with_checkpoint"] is None
    assert data["seconds_by_phase"] == {"stack": 8.0, "stream": 24.5} and data["seconds_total"] == 32.5
    assert DemoSummary.model_validate(data) == DemoSummary.of(result(), timings, 32.5)


def test_the_table_labels_each_count():
    rows = dict(DemoSummary.of(result(checkpoint="ram_plus.pth", official=[{}] * 5), Timings({}), 1.0).rows())
    assert rows["held-out mAP"] == "0.741 (label prior: 0.340)"
    assert rows["held-out AP by group"] == "colour 0.950, shape 0.700, background 1.000"
    assert rows["stream"] == "5 requests -> 2 results, 1 duplicates"
    assert rows["backfill"] == "125 tagged, 3 errors, 0 skipped (done before)"
    assert rows["photos tagged with --checkpoint"] == "5 (ram_plus.pth)"
    assert rows["every replica on demo@2"] == "yes"


def test_it_ends_with_what_to_do_next():
    text = what_next(Path("var/demo/report.html"), Path("var/demo/summary.json"), artifact="s3://ramplus/models/demo/v1", stack_stopped=True)
    assert "xdg-open var/demo/report.html" in text and "var/demo/summary.json" in text
    assert "python infra/local/stack.py up" in text
    assert "ramplus tag path/to/images --checkpoint s3://ramplus/models/demo/v1" in text
    kept = what_next(Path("r.html"), Path("s.json"), artifact="s3://m/v1", stack_stopped=False)
    assert "stack.py up" not in kept  # the stack it found running is still running
