from django.db import models


class Indexed(models.Model):
    """Rows that carry Consul's CreateIndex / ModifyIndex."""

    create_index = models.BigIntegerField(default=0)
    modify_index = models.BigIntegerField(default=0)

    class Meta:
        abstract = True
