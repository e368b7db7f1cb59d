"""The web UI's views: adapters that look up, authorise, call the domain and render."""
