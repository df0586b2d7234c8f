"""The accepted events of a replayed input file: its lines that are not dead letters in the lake
(both routes), read back by their offset. Shared by the independent checks."""

import glob
import json


def accepted_lines(con, lake, input_path):
    """Yields (offset, event) for every input line that is not a dead letter."""
    paths = [p for p in (f"{lake}/dead_letter", f"{lake}/restricted/dead_letter") if glob.glob(f"{p}/**/*.parquet", recursive=True)]
    dead = {r[0] for r in con.execute("SELECT \"offset\" FROM read_parquet([" + ", ".join(f"'{p}/**/*.parquet'" for p in paths) + "])").fetchall()}
    with open(input_path, "rb") as f:
        for offset, line in enumerate(f):
            if offset not in dead:
                yield offset, json.loads(line)


def event_time_ms(event):
    """The event's `timestamp` in ms since the epoch, rounded as Sightline reads it."""
    from datetime import datetime

    return int(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp() * 1000 + 0.5)
