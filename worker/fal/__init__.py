"""fal's queue API over httpx: submit, status, result, cancel; uploads and safe downloads.

Knows nothing of the database. Every failure is one of the provider errors of
:mod:`jobs.errors` (the specific subclasses are in :mod:`worker.fal.errors`).

The modules: :mod:`~worker.fal.client` (``FalClient``: the queue API), :mod:`~worker.fal.storage`
(uploads and downloads), :mod:`~worker.fal.http` (the key's auth, retries, bounded decoding),
:mod:`~worker.fal.origin` (a URL's origin as httpx reads it, without loading httpx),
:mod:`~worker.fal.sse` (the status stream's events, bounded), :mod:`~worker.fal.models`
(what fal answers), :mod:`~worker.fal.errors`, :mod:`~worker.fal.redact` (the key kept out of
every log line) and :mod:`~worker.fal.webhooks` (fal's signed deliveries). Import from them:
this package imports nothing, so a command that only redacts its logs (every command does)
does not load the HTTP client with it (about 0.2 s of start-up, measured on ``wanbatch status``).
"""
