"""Load tests: closed_loop.py (throughput probe); Locust users and the open-loop runner come with the load-test issue."""
