"""The rotation search's per-layer table, logged to the Trainer's ``report_to`` integrations as a table.

Scalars (``roste/search/layer_<i>/<R>_error_on`` ...) go through ``Trainer.log`` like every metric; a
table needs each integration's own call, made here on the integration callbacks transformers
created for ``report_to``:

* TensorBoard (``TensorBoardCallback``): ``tb_writer.add_text("roste/rotation_search", markdown, step)``;
* Weights & Biases (``WandbCallback``): ``wandb.log({"roste/rotation_search": wandb.Table(...)})``;
* MLflow (``MLflowCallback``): ``mlflow.log_table(columns, "roste_rotation_search.json")``.

Other integrations receive the scalars only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SEARCH_TABLE_KEY", "log_search_table", "search_table"]

SEARCH_TABLE_KEY = "roste/rotation_search"


def search_table(result: Any) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of the per-layer table: layer, R2/R3/R4 chosen, error off / on of each."""
    columns = ["layer", "R2", "R3", "R4", "R2_error_off", "R2_error_on", "R3_error_off", "R3_error_on",
               "R4_error_off", "R4_error_on"]
    rows = []
    for row in result.table():
        cells: list[Any] = [row["layer"]] + [bool(row.get(n, False)) for n in ("R2", "R3", "R4")]
        for n in ("R2", "R3", "R4"):
            err = row.get(f"{n}_error")
            cells += [None, None] if err is None else [float(err[0]), float(err[1])]
        rows.append(cells)
    return columns, rows


def log_search_table(callbacks: list[Any], result: Any, step: int) -> list[str]:
    """Log the table to every integration callback that supports tables; returns their class names."""
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    columns, rows = search_table(result)
    done = []
    for cb in callbacks:
        if isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.add_text(SEARCH_TABLE_KEY, result.to_markdown(), step)
        elif isinstance(cb, WandbCallback) and getattr(cb, "_initialized", False) and cb._wandb is not None:
            cb._wandb.log({SEARCH_TABLE_KEY: cb._wandb.Table(columns=columns, data=rows)}, commit=False)
        elif isinstance(cb, MLflowCallback) and getattr(cb, "_initialized", False) and cb._ml_flow is not None:
            data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
            cb._ml_flow.log_table(data=data, artifact_file="roste_rotation_search.json")
        else:
            continue
        done.append(type(cb).__name__)
    return done
