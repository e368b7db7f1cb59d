"""The sidecar's HTTP (L7) proxy: HTTP/1.1 over httptools, routing by the
compiled discovery chain, retries, timeouts and the resilience features.

`wire` speaks HTTP/1.1, `routes` matches requests to routes and splits,
`guards` holds rate limits, circuit breakers, the retry budget and outlier
detection, and `engine` puts a request through all of them.
"""
