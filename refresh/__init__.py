"""The nightly batch refresh: every user's vector into a new embedding version, validated, then
readers switched atomically (docs/refresh.md). Runs on onnxruntime; never imports torch.

Which module runs which step (`refresh.job.refresh` calls them in this order):

    config.py      RefreshConfig: what a run is asked to do, its modes, engines and defaults
    lock.py        one run per model: the Redis lock, its renewal and fencing token
    job.py         the run: plan, compute the parts not done, validate, publish, expire
    source.py      read: each user's latest offline feature row, the file split into parts
    checkpoint.py  resume state in the version's Redis metadata: the plan, finished parts
    worker.py      compute: one part read, encoded (onnxruntime) and written; the local engine
    ray_engine.py  compute on a Ray Data actor pool (one PartWorker per actor)
    validate.py    the checks before the switch, and the drift report
    versions.py    expiry of old versions, rollback, the version listing
    errors.py      RefreshValidationError, NoVersionError, RefreshLockedError, StaleFlipError, ...

The `userembed refresh` / `userembed rollback` commands are userembed/commands/refresh.py.
"""
