"""a2ad's benchmark harness: `make bench` (every scenario) and `make bench-quick`.

Each part is its own process so that no two share an event loop: the
references and fake agents (`servers`), the load generator (`loadgen`, or
Debian's `wrk` through `wrkdrive`), raw SQLite (`sqlite_raw`) and a2ad itself
(`a2ad serve`). `run` starts them, runs the scenarios and writes the report.
"""
