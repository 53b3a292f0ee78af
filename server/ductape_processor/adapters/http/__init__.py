"""HTTP upstreams: the pooled client (`client`) and the request encoding (`encoding`). Import each from its module."""
