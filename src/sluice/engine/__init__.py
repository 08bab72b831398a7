"""The engine: plan graph, run loop, checkpoint, watermarks, stages, supervisor, metrics."""
