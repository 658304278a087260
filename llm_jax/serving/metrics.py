"""Prometheus metrics of one server: load (read from the engine at scrape time) and latencies."""

import prometheus_client as prom

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
  """The server's metrics, in a registry of their own (several apps may share a process)."""

  def __init__(self, engine):
    self.registry = prom.CollectorRegistry()
    gauges = (('queue_length', 'Requests waiting for a decode slot.', 'waiting'),
              ('active_slots', 'Decode slots holding a request.', 'active'),
              ('slots', 'Decode slots of the engine.', 'slots'),
              ('tokens_per_second', 'Output tokens per second over the last seconds.',
               'tokens_per_second'))
    for name, doc, key in gauges:
      gauge = prom.Gauge(f'llm_jax_{name}', doc, registry=self.registry)
      gauge.set_function(lambda key=key: engine.load()[key])
    self.requests = prom.Counter('llm_jax_requests', 'Finished requests by finish reason.',
                                 ['finish_reason'], registry=self.registry)
    self.prompt_tokens = prom.Counter('llm_jax_prompt_tokens', 'Prompt tokens received.',
                                      registry=self.registry)
    self.generated_tokens = prom.Counter('llm_jax_generated_tokens', 'Tokens generated.',
                                         registry=self.registry)
    self.rejected = prom.Counter('llm_jax_rejected_requests', 'Requests answered 4xx/5xx.',
                                 ['status'], registry=self.registry)
    self.time_to_first_token = prom.Histogram(
        'llm_jax_time_to_first_token_seconds', 'From request to its first token.',
        buckets=_LATENCY_BUCKETS, registry=self.registry)
    self.inter_token_latency = prom.Histogram(
        'llm_jax_inter_token_latency_seconds', 'Mean time between a request\'s tokens.',
        buckets=_LATENCY_BUCKETS, registry=self.registry)
    self.request_latency = prom.Histogram(
        'llm_jax_request_latency_seconds', 'From request to its last token.',
        buckets=_LATENCY_BUCKETS, registry=self.registry)

  def record(self, finish_reason: str, num_prompt: int, num_new: int, started: float,
             first_token: float, finished: float) -> None:
    """Counts one finished generation; times from time.monotonic()."""
    self.requests.labels(finish_reason).inc()
    self.prompt_tokens.inc(num_prompt)
    self.generated_tokens.inc(num_new)
    if num_new:
      self.time_to_first_token.observe(first_token - started)
      self.request_latency.observe(finished - started)
    if num_new > 1:
      self.inter_token_latency.observe((finished - first_token) / (num_new - 1))

  def exposition(self) -> bytes:
    return prom.generate_latest(self.registry)
