"""Scheduling and the request path: the batch queue, batch execution, validation, planning,
assembly, streams, and long articles in chunks. Imports no torch, no protobuf, nothing of api/."""
