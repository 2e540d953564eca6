"""Operating running jobs: requests into a run (save now, stop, abort) and its status heartbeat."""
