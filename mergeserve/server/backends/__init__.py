"""What serves a composition behind the gateway: one small interface, three implementations.

- local (backends/local.py): the in-process engine;
- openai (backends/proxy.py): any OpenAI-compatible server already running, proxied;
- vllm (backends/vllm.py): the composition's export served by a managed vLLM child process.

The registry leases revisions holding a Backend; the OpenAI routes validate, admit and hand
each request to its lease's backend together with a Call (what it may use of HTTP and the
gateway); both are in backends/base.py. Aliases, limits, metrics and feedback work the same
whatever serves.
"""
