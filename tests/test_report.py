"""report.py: the results table lists every row and the run's figures."""

from spinlearn.report import format_table


def test_table_has_every_row_in_order_and_the_run_figures():
    metrics = {"model": "m", "device": "cpu", "rows": {"float": 66.1194, "W4A4KV4 RTN, no rotation": 78.5},
               "steps": 200, "train_time_s": 173.2, "wall_time_s": 249.0}
    table = format_table(metrics)
    lines = table.splitlines()
    assert lines[2:6] == ["| setting | perplexity |", "|---|---|", "| float | 66.119 |",
                          "| W4A4KV4 RTN, no rotation | 78.500 |"]
    assert "steps: 200" in table and "train_time_s: 173.2" in table and "wall_time_s: 249.0" in table
