"""JupyterHub for a course with LabLink: the allocator is a Hub service, every student's server a replica.

    LABLINK_DATABASE_URL=postgresql://lablink:secret@db.example.edu/lablink \
    LABLINK_ENROLL_TOKEN=a-long-random-fleet-token \
    LABLINK_EXAMPLE_PASSWORD=a-student-password \
    LABLINK_EXAMPLE_ADMIN_PASSWORD=an-admin-password-of-32-characters-or-more \
    jupyterhub -f examples/jupyterhub/jupyterhub_config.py

The first part is what a course adds to its own jupyterhub_config.py. The second
stands in for the course's authenticator and spawner, so that this file runs a
whole Hub on one machine; the integration test (tests/test_jupyterhub.py) runs it,
choosing the ports (LABLINK_SERVICE_PORT for the service, the Hub's on its
command line).
"""

import os

c = get_config()  # noqa: F821 (JupyterHub defines it while loading this file)

# -- what a course needs ---------------------------------------------------------------

# Secrets travel in environment variables: a command line is visible to every `ps`.
database_url = os.environ["LABLINK_DATABASE_URL"]

c.JupyterHub.services = [
    {
        # VMs long-poll and instructors work at /services/lablink/; its web form logs
        # students in with Hub OAuth.
        "name": "lablink",
        "url": "http://127.0.0.1:" + os.environ.get("LABLINK_SERVICE_PORT", "10101"),
        "command": ["jupyter", "lablink"],
        "environment": {
            "LABLINK_DATABASE_URL": database_url,
            "LABLINK_ENROLL_TOKEN": os.environ["LABLINK_ENROLL_TOKEN"],
        },
        "oauth_no_confirm": True,
    },
]

# Every student's own server loads LabLink too, on the same database: the panel in a
# notebook asks the student's own server, with the token the kernel already has.
c.Spawner.environment = {"LABLINK_DATABASE_URL": database_url}

# Students may open the service's web form (the panel needs no extra scope).
c.JupyterHub.load_roles = [
    {"name": "user", "scopes": ["self", "access:services!service=lablink"]},
]

# Hub admins are LabLink instructors.
c.Authenticator.admin_users = {"teacher"}

# -- stand-ins for the course's own authenticator and spawner ---------------------------

# Anyone may log in as any name with the shared password; admins with theirs.
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = os.environ["LABLINK_EXAMPLE_PASSWORD"]
c.SharedPasswordAuthenticator.admin_password = os.environ["LABLINK_EXAMPLE_ADMIN_PASSWORD"]
c.Authenticator.allow_all = True

# Single-user servers run as the Hub's own system user, each in a home of its own.
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = os.path.join(
    os.environ.get("LABLINK_EXAMPLE_HOMES", "/tmp/lablink-example-homes"), "{username}"
)
if os.geteuid() == 0:
    # Jupyter refuses root unless told; here root is the one system user there is.
    c.Spawner.args = ["--allow-root"]
    c.JupyterHub.services[0]["command"].append("--allow-root")
