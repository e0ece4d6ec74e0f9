"""The peer in the benchmark: a dlt pipeline (rest_api source, offset paginator, incremental
loading on created_at) copying ChartHero encounters from the simulator into DuckDB.

Usage: dlt_peer.py BASE_URL API_KEY START_AT WORK_DIR
Prints one JSON line: elapsed seconds, rows loaded, and the file holding the loaded IDs.
Run by benches/envelope.rs (scenario `dlt`); see benches/run.sh for the environment.
"""

import json
import os
import sys
import time

import dlt
from dlt.sources.rest_api import rest_api_source


def main() -> None:
    base_url, api_key, start_at, work_dir = sys.argv[1:5]
    source = rest_api_source(
        {
            "client": {
                "base_url": base_url + "/external/v1/",
                "auth": {"type": "bearer", "token": api_key},
                "paginator": {
                    "type": "offset",
                    "limit": 100,
                    "offset_param": "offset",
                    "limit_param": "limit",
                    "total_path": "total",
                    # The API refuses offsets above 10000; dlt stops there.
                    "maximum_offset": 10000,
                },
            },
            "resource_defaults": {"primary_key": "encounter_id", "write_disposition": "merge"},
            "resources": [
                {
                    "name": "encounters",
                    "endpoint": {
                        "path": "encounters",
                        "data_selector": "items",
                        "params": {
                            "sort_order": "asc",
                            "start_at": {
                                "type": "incremental",
                                "cursor_path": "created_at",
                                "initial_value": start_at,
                            },
                        },
                    },
                }
            ],
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name="charthero_peer",
        destination=dlt.destinations.duckdb(os.path.join(work_dir, "peer.duckdb")),
        dataset_name="charthero",
        pipelines_dir=os.path.join(work_dir, "pipelines"),
        progress=None,
    )
    started = time.time()
    pipeline.run(source)
    elapsed = time.time() - started
    with pipeline.sql_client() as client:
        ids = [row[0] for row in client.execute_sql("SELECT encounter_id FROM encounters")]
    ids_path = os.path.join(work_dir, "peer_ids.txt")
    with open(ids_path, "w", encoding="utf-8") as f:
        f.write("\n".join(ids))
    print(json.dumps({"elapsed": elapsed, "rows": len(ids), "ids": ids_path}))


if __name__ == "__main__":
    main()
