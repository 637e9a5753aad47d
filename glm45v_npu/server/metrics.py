"""Prometheus metrics of one server (its own registry, so several servers in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("glm45v_requests", "Requests by final status", ["status"], registry=r)
        self.prompt_tokens = Counter("glm45v_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("glm45v_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("glm45v_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("glm45v_inter_token_latency_seconds", "Time between tokens", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.running = Gauge("glm45v_requests_running", "Requests running", registry=r)
        self.waiting = Gauge("glm45v_requests_waiting", "Requests waiting", registry=r)
        self.kv_usage = Gauge("glm45v_kv_cache_usage_ratio", "Share of KV-cache blocks in use", registry=r)

    def on_step(self, stats) -> None:
        self.running.set(stats.running_requests)
        self.waiting.set(stats.waiting_requests)
        self.kv_usage.set(1 - stats.free_blocks / max(1, stats.num_blocks))

    def on_output(self, out) -> None:
        """Counted when a request finishes (outputs are cumulative or deltas; the metrics read the totals)."""
        if not out.finished:
            return
        m = out.metrics
        reasons = {c.finish_reason for c in out.outputs}
        self.requests.labels(status="aborted" if reasons == {"abort"} else "finished").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        for times in m.token_times:
            self.generation_tokens.inc(len(times))
            if times:
                self.ttft.observe(times[0])
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)

    def rejected(self, status: int) -> None:
        self.requests.labels(status=f"rejected_{status}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
