"""The page in front of a remote OpenAI-compatible engine (our ``serve``, vLLM, SGLang): ``engine.RemoteEngine``
is the engine seam over HTTP. Import the modules themselves; this package file stays empty so the UI can read the
data types (``snapshot``, ``info``) without the HTTP client."""
