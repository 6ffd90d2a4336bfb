"""The network: link model, transport, protocol, frame cache, HTTP guards."""
