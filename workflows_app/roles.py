"""The three roles, as Django groups of model permissions.

Created by migration ``0002_roles``; :func:`sync_roles` re-creates them (used
after a database flush in tests, and safe to run on a live site).
"""

from __future__ import annotations

from typing import Any

VIEW = [
    "view_workflowdefinition",
    "view_stepdefinition",
    "view_workflowinstance",
    "view_stepexecution",
    "view_attempt",
    "view_transitionlog",
    "view_bulkjob",
    "view_knownfailure",
    "view_approvalrequest",
    # Saved views: everyone with the dashboard saves and shares filtered lists.
    "view_savedview",
    "add_savedview",
    "delete_savedview",
]
OPERATE = [
    "retry_step",
    "resume_instance",
    "compensate_instance",
    "mark_step_done",
    "cancel_instance",
    "close_instance",
    "retry_compensation",
    "acknowledge_alert",
    # Failure groups: mark a group as known, with a note.
    "add_knownfailure",
    "change_knownfailure",
    "delete_knownfailure",
    # Four-eyes: decide on another operator's request (never one's own).
    "approve_request",
    # Repair: correct an instance's input or a step's recorded output.
    "edit_instance_data",
    # Restart from an earlier step (compensates the steps it re-runs).
    "restart_instance",
    # Timers: wake early or extend; steps for a person: claim and complete.
    "operate_timer",
    "complete_human_step",
]
EDIT_DEFINITIONS = [
    "add_workflowdefinition",
    "change_workflowdefinition",
    "delete_workflowdefinition",
    "add_stepdefinition",
    "change_stepdefinition",
    "delete_stepdefinition",
]
# API tokens are created (the clear token shown once), edited and revoked in
# the admin; never deleted, so the list keeps who had access.
MANAGE_TOKENS = ["view_apitoken", "add_apitoken", "change_apitoken"]
ROLES = {
    "viewer": VIEW,
    "operator": VIEW + OPERATE,
    # Also needs is_staff on the user to enter the admin.
    "workflow admin": VIEW + EDIT_DEFINITIONS + MANAGE_TOKENS,
}


def sync_roles_in_migration(apps: Any, *, strict: bool = True) -> None:
    """For a data migration: create the permissions of the models migrated so
    far (Django normally creates them after all migrations), then sync."""
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    sync_roles(
        apps.get_model("auth", "Group"),
        apps.get_model("auth", "Permission"),
        strict=strict,
    )


def sync_roles(
    group_model: Any = None, permission_model: Any = None, *, strict: bool = True
) -> None:
    """Create the groups and give each exactly its permissions.

    A migration that ran before a model existed passes ``strict=False``: the
    permissions of later models are then added by a later migration."""
    if group_model is None:
        from django.contrib.auth.models import Group, Permission

        group_model, permission_model = Group, Permission
    for name, codenames in ROLES.items():
        group, _ = group_model.objects.get_or_create(name=name)
        perms = permission_model.objects.filter(
            content_type__app_label="workflows_app", codename__in=codenames
        )
        missing = set(codenames) - set(perms.values_list("codename", flat=True))
        if missing and strict:
            raise RuntimeError(
                f"permissions missing for role {name}: {sorted(missing)}"
            )
        group.permissions.set(perms)
