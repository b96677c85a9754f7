"""The runtime: dataflow graph, planning, subtask actors, channels and jobs."""
