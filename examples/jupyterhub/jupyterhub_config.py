"""JupyterHub for a course with LabLink: the allocator is a Hub service, and students' notebooks call it.

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

Run it from a folder of its own: the Hub keeps jupyterhub.sqlite and its cookie
secret in the current folder, and listens on 8000, with its API on 8081 and the
proxy's on 8001, unless told other ports (--port, --JupyterHub.hub_port,
--ConfigurableHTTPProxy.api_url).
"""

import os

c = get_config()  # noqa: F821 (JupyterHub defines it while loading this file)

# -- what a course needs ---------------------------------------------------------------

service_url = "http://127.0.0.1:" + os.environ.get("LABLINK_SERVICE_PORT", "10101")

c.JupyterHub.services = [
    {
        # VMs long-poll, students' notebooks call and instructors work at /services/lablink/;
        # its web form logs students in with Hub OAuth.
        "name": "lablink",
        "url": service_url,
        "command": ["jupyter", "lablink"],
        # The database password is in this process alone. Secrets travel in environment
        # variables: a command line is visible to every `ps`.
        "environment": {
            "LABLINK_DATABASE_URL": os.environ["LABLINK_DATABASE_URL"],
            "LABLINK_ENROLL_TOKEN": os.environ["LABLINK_ENROLL_TOKEN"],
        },
        "oauth_no_confirm": True,
    },
]

# Where students' kernels reach the service (here on one machine, its own address; behind
# the proxy it is https://hub.example.edu/services/lablink/). No database URL for students.
c.Spawner.environment = {"LABLINK_URL": service_url + "/services/lablink/"}

# The server's token (JUPYTERHUB_API_TOKEN, which the kernel can read) may call the service
# as its own user: JupyterHub's two default server scopes, and access to the service.
c.Spawner.server_token_scopes = [
    "users:activity!user",
    "access:servers!server",
    "access:services!service=lablink",
]

# Users may open the service: its web form, and what their server tokens may hold (a server
# token gets only scopes its user has).
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

# Single-user servers run as the Hub's own system user, each in a home of its own. That
# isolates nothing (a student's kernel could read the Hub's and the service's environment
# in /proc): a course's spawner gives students users or containers of their own.
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = os.path.join(
    os.environ.get("LABLINK_EXAMPLE_HOMES", "/tmp/lablink-example-homes"), "{username}"
)
if os.geteuid() == 0:
    # Jupyter refuses root unless told; here root is the one system user there is.
    c.Spawner.args = ["--allow-root"]
    c.JupyterHub.services[0]["command"].append("--allow-root")
