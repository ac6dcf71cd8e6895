"""Generated documents stay in step with the schema (run `python -m trainplan.docgen` to refresh)."""

from trainplan.docgen import outputs


def test_generated_docs_are_up_to_date(repo):
    stale = [rel for rel, text in outputs().items() if not (repo / rel).is_file() or (repo / rel).read_text() != text]
    assert not stale, f"out of date: {stale}; run `python -m trainplan.docgen`"


def test_reference_mentions_every_parallel_field(repo):
    text = outputs()["docs/spec-reference.md"]
    for key in ("dp", "tp", "pp", "micro_batch", "schedule", "zero", "recompute", "allreduce", "sync", "compression"):
        assert f"| `{key}` |" in text
