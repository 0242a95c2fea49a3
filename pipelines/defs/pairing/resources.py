"""The DuckDB engine used by the pairing assets (spatial extension loaded offline)."""


import dagster as dg
import duckdb
from pydantic import Field

from gair_dataset.pairing import DEFAULT_MEMORY_LIMIT, connect


class DuckDBEngine(dg.ConfigurableResource):
    """An in-memory DuckDB with the spatial extension from the pinned wheel (no download)."""

    memory_limit: str = Field(default=DEFAULT_MEMORY_LIMIT, description="DuckDB memory_limit")
    threads: int = Field(default=0, description="0 = DuckDB's default (all cores)")
    temp_directory: str = Field(default="", description="where DuckDB spills beyond memory_limit; empty = a "
                                "folder of the process under the system temp dir")

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A fresh connection."""
        return connect(memory_limit=self.memory_limit, threads=self.threads or None,
                       temp_directory=self.temp_directory or None)
