"""vhost-user: the protocol (``protocol``) and the VMM's front-end (``frontend``).

See docs/vhost-user-dax.md sections 1-2 for the protocol facts and
``frontend`` for the connection life cycle.  Nothing is imported here:
pyvmm-virtiofsd uses ``protocol`` alone and need not load the front-end.
"""
