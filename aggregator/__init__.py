"""The aggregator service: round lock, collect, reduce, outer step, commit."""
