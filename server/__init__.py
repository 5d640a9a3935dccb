"""The gRPC scoring service: servicers, scenario rules, consent, store, serving state, metrics."""
