"""qserve past one machine: engine replicas as a Ray Serve deployment (`qserve serve --replicas N|auto`).

Layout: ``autoscaling`` (the scaling decision, a pure function, and the Ray Serve policy around it),
``routing`` (session keys and the replica choice, pure), ``router`` (the Ray Serve request router around
it), ``deployment`` (the engine replica and the HTTP ingress), ``stats`` (the cluster's metrics),
``launch`` (ray.init, serve.run). ``router`` and ``deployment`` import Ray; ``stats``, ``launch`` and
``autoscaling`` only inside the functions that talk to a cluster; ``routing`` never. Nothing outside this
package imports it except the ``--replicas`` branch of the CLI.
"""
