"""The timeline's keys to its instance and step lose their database
constraints (models/audit.py says why); their indexes and Django's
relations stay. Nothing is rewritten: dropping a constraint is a catalogue
change."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("workflows_app", "0032_fence_function"),
    ]

    operations = [
        migrations.AlterField(
            model_name="transitionlog",
            name="instance",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="history",
                to="workflows_app.workflowinstance",
            ),
        ),
        migrations.AlterField(
            model_name="transitionlog",
            name="step",
            field=models.ForeignKey(
                blank=True,
                db_constraint=False,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="history",
                to="workflows_app.stepexecution",
            ),
        ),
    ]
