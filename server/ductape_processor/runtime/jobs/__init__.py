"""Jobs: a durable scheduler that runs any resource of a product once, after a delay or on a repeat (docs/jobs.md).

`runtime.py` serves JobService's calls, `scheduler.py` claims and runs what falls due, `timing.py` computes next
times (cron in a time zone, intervals), `targets.py` calls the other resource kinds, `model.py` and `codec.py` hold
what a job is. Import from the modules."""
