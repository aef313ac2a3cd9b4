"""Creates dagcast's AWS resources from infra/resources.yaml with boto3.

moto's CloudFormation skips subscriptions, queue policies and bucket notifications,
and cannot run Chalice's SAM output, so the embedded stack reads the template's
resource definitions and makes the equivalent API calls. Local and cloud share one
definition; tests/unit/test_bootstrap.py checks that they agree.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "resources.yaml"
SUPPORTED = ("AWS::DynamoDB::Table", "AWS::SNS::Topic", "AWS::SQS::Queue", "AWS::SQS::QueuePolicy", "AWS::S3::Bucket",
             "AWS::KMS::Key", "AWS::Events::EventBus")
# Cloud-only resources: roles, log groups, the API Gateway account setting, alarms and dashboard have no
# meaning on the embedded stack; moto enforces bucket policies, and their TLS-only statements would refuse
# its plain-HTTP endpoint. Entries without a Type complete the functions and API that `chalice package` generates.
CLOUD_ONLY = ("AWS::IAM::Role", "AWS::IAM::Policy", "AWS::S3::BucketPolicy", "AWS::Logs::LogGroup", "AWS::ApiGateway::Account",
              "AWS::CloudFormation::WaitConditionHandle", "AWS::CloudWatch::Alarm", "AWS::CloudWatch::Dashboard")
# Which template resource each output names.
OUTPUTS = {"StateTable": "table_name", "BundlesBucket": "bucket", "VersionsTopic": "topic_arn", "IngestQueue": "ingest_queue_url",
           "IngestDeadLetterQueue": "dead_letter_queue_url", "SigningKey": "signing_key_arn",
           "EventBus": "event_bus_name", "WebhookQueue": "webhook_queue_url",
           "WebhookDeadLetterQueue": "webhook_dead_letter_queue_url"}


@dataclass
class StackOutputs:
    table_name: str
    bucket: str
    topic_arn: str
    ingest_queue_url: str
    dead_letter_queue_url: str
    signing_key_arn: str
    event_bus_name: str = ""
    webhook_queue_url: str = ""
    webhook_dead_letter_queue_url: str = ""


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


NO_VALUE = object()  # Ref AWS::NoValue: the property or list item is left out


class Resolver:
    """Resolves Ref, Fn::Sub, Fn::GetAtt, Fn::If and Fn::Join against pseudo parameters, parameter values,
    conditions and created resources; AWS::NoValue removes what it stands for."""

    def __init__(self, stack_name: str, region: str, account: str) -> None:
        self.pseudo = {
            "AWS::StackName": stack_name,
            "AWS::Region": region,
            "AWS::AccountId": account,
            "AWS::Partition": "aws",
        }
        self.refs: dict[str, Any] = {}
        self.arns: dict[str, str] = {}
        self.conditions: dict[str, bool] = {}

    def evaluate(self, conditions: dict[str, Any]) -> None:
        """Evaluate the template's Conditions (Fn::Equals, Fn::Not, Fn::And, Fn::Or, Condition) once."""

        def truth(node: Any) -> bool:
            if set(node) == {"Condition"}:
                return truth(conditions[node["Condition"]])
            (fn, args), = node.items()
            if fn == "Fn::Equals":
                left, right = (str(self(a)) for a in args)
                return left == right
            if fn == "Fn::Not":
                return not truth(args[0])
            if fn == "Fn::And":
                return all(truth(a) for a in args)
            if fn == "Fn::Or":
                return any(truth(a) for a in args)
            raise ValueError(f"unsupported condition function {fn}")

        self.conditions = {name: truth(node) for name, node in conditions.items()}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [r for r in (self(v) for v in value) if r is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if set(value) == {"Ref"}:
            name = value["Ref"]
            if name == "AWS::NoValue":
                return NO_VALUE
            return self.pseudo.get(name) or self.refs[name]
        if set(value) == {"Fn::If"}:
            condition, if_true, if_false = value["Fn::If"]
            return self(if_true if self.conditions[condition] else if_false)
        if set(value) == {"Fn::Join"}:
            sep, items = value["Fn::Join"]
            resolved = self(items)
            return sep.join(str(i) for i in (resolved if isinstance(resolved, list) else [resolved]))
        if set(value) == {"Fn::GetAtt"}:
            logical, attr = value["Fn::GetAtt"]
            if attr != "Arn":
                raise ValueError(f"unsupported attribute {logical}.{attr}")
            return self.arns[logical]
        if set(value) == {"Fn::Sub"}:
            return re.sub(r"\$\{([^}]+)\}", lambda m: self({"Ref": m.group(1)}), value["Fn::Sub"])
        return {k: r for k, r in ((k, self(v)) for k, v in value.items()) if r is not NO_VALUE}


def _order(resources: dict[str, Any]) -> list[str]:
    """Logical ids in dependency order (DependsOn, Ref and GetAtt edges)."""

    def deps(node: Any) -> set[str]:
        found: set[str] = set()
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "Ref" and isinstance(v, str) and v in resources:
                    found.add(v)
                elif k == "Fn::GetAtt":
                    found.add(v[0])
                else:
                    found |= deps(v)
        elif isinstance(node, list):
            for v in node:
                found |= deps(v)
        return found

    graph = {}
    for name, res in resources.items():
        edges = deps(res.get("Properties", {}))
        depends = res.get("DependsOn", [])
        edges |= {depends} if isinstance(depends, str) else set(depends)
        graph[name] = edges & set(resources)  # an edge to a cloud-only resource orders nothing here
    ordered: list[str] = []
    while graph:
        ready = sorted(n for n, e in graph.items() if e <= set(ordered))
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(graph)}")
        ordered.extend(ready)
        for n in ready:
            del graph[n]
    return ordered


def _queue_attributes(props: dict[str, Any]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for key in ("VisibilityTimeout", "MessageRetentionPeriod", "ReceiveMessageWaitTimeSeconds", "DelaySeconds",
                "SqsManagedSseEnabled", "KmsMasterKeyId"):
        if key in props:
            value = props[key]
            attrs[key] = str(value).lower() if isinstance(value, bool) else str(value)
    if "RedrivePolicy" in props:
        attrs["RedrivePolicy"] = json.dumps(props["RedrivePolicy"])
    return attrs


def _exists(exc: Exception, *codes: str) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in codes


def bootstrap(session: Any, stack_name: str, template: dict[str, Any] | None = None) -> StackOutputs:
    """Create every supported resource of the template in the account `session` points at. Resources
    that exist already (an embedded stack started again on its kept state) are reused and their
    settings applied again."""
    template = template or load_template()
    region = session.region_name
    account = session.client("sts").get_caller_identity()["Account"]
    resolve = Resolver(stack_name, region, account)
    resolve.refs.update({name: _parameter_default(p) for name, p in template.get("Parameters", {}).items()})
    resolve.evaluate(template.get("Conditions", {}))
    resources: dict[str, Any] = {
        name: res for name, res in template["Resources"].items()
        if res.get("Type") not in (None, *CLOUD_ONLY) and resolve.conditions.get(res.get("Condition", ""), True)
    }
    out: dict[str, str] = {}
    for logical in _order(resources):
        res = resources[logical]
        kind, props = res["Type"], resolve(res.get("Properties", {}))
        if kind == "AWS::DynamoDB::Table":
            ddb = session.client("dynamodb")
            try:
                ddb.create_table(
                    TableName=props["TableName"],
                    AttributeDefinitions=props["AttributeDefinitions"],
                    KeySchema=props["KeySchema"],
                    BillingMode=props.get("BillingMode", "PAY_PER_REQUEST"),
                    **({"SSESpecification": {"Enabled": props["SSESpecification"]["SSEEnabled"]}}
                       if "SSESpecification" in props else {}),
                )
                created = True
            except Exception as exc:
                if not _exists(exc, "ResourceInUseException"):
                    raise
                created = False
            ddb.get_waiter("table_exists").wait(TableName=props["TableName"])
            pitr = props.get("PointInTimeRecoverySpecification")
            if pitr:
                ddb.update_continuous_backups(TableName=props["TableName"], PointInTimeRecoverySpecification=pitr)
            ttl = props.get("TimeToLiveSpecification")
            if ttl and created:
                ddb.update_time_to_live(TableName=props["TableName"], TimeToLiveSpecification=ttl)
            resolve.refs[logical] = made = props["TableName"]
        elif kind == "AWS::SNS::Topic":
            arn = session.client("sns").create_topic(Name=props["TopicName"])["TopicArn"]
            resolve.refs[logical] = resolve.arns[logical] = made = arn
        elif kind == "AWS::SQS::Queue":
            sqs = session.client("sqs")
            try:
                url = sqs.create_queue(QueueName=props["QueueName"], Attributes=_queue_attributes(props))["QueueUrl"]
            except Exception as exc:
                if not _exists(exc, "QueueAlreadyExists", "QueueNameExists"):
                    raise
                url = sqs.get_queue_url(QueueName=props["QueueName"])["QueueUrl"]
                sqs.set_queue_attributes(QueueUrl=url, Attributes=_queue_attributes(props))
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            resolve.refs[logical], resolve.arns[logical] = url, arn
            made = url
        elif kind == "AWS::SQS::QueuePolicy":
            sqs = session.client("sqs")
            for url in props["Queues"]:
                sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(props["PolicyDocument"])})
            made = ""
        elif kind == "AWS::KMS::Key":
            kms = session.client("kms")
            alias = f"alias/{stack_name}-{logical}"
            try:
                key = kms.describe_key(KeyId=alias)["KeyMetadata"]
            except Exception as exc:
                if not _exists(exc, "NotFoundException"):
                    raise
                key = kms.create_key(
                    Description=props.get("Description", ""), KeySpec=props["KeySpec"], KeyUsage=props["KeyUsage"]
                )["KeyMetadata"]
                kms.create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
            resolve.refs[logical], resolve.arns[logical] = key["KeyId"], key["Arn"]
            made = key["Arn"]
        elif kind == "AWS::S3::Bucket":
            _create_bucket(session.client("s3"), region, props)
            resolve.refs[logical] = made = props["BucketName"]
            resolve.arns[logical] = f"arn:aws:s3:::{props['BucketName']}"
        elif kind == "AWS::Events::EventBus":
            events = session.client("events")
            try:
                arn = events.create_event_bus(Name=props["Name"])["EventBusArn"]
            except Exception as exc:
                if not _exists(exc, "ResourceAlreadyExistsException"):
                    raise
                arn = events.describe_event_bus(Name=props["Name"])["Arn"]
            made = props["Name"]
            resolve.refs[logical], resolve.arns[logical] = made, arn
        else:
            raise ValueError(f"{logical}: resource type {kind} is not supported by the embedded stack")
        if logical in OUTPUTS:
            out[OUTPUTS[logical]] = made
    return StackOutputs(**out)


def _parameter_default(param: dict[str, Any]) -> Any:
    """A parameter's value on the embedded stack: its default (a list for a CommaDelimitedList)."""
    default = param.get("Default")
    if param.get("Type") == "CommaDelimitedList":
        return [] if default in (None, "") else [v.strip() for v in str(default).split(",")]
    return default


def _create_bucket(s3: Any, region: str, props: dict[str, Any]) -> None:
    """The bucket with its settings; not its LoggingConfiguration: moto writes no access logs, and would
    want the log bucket's policy, which is cloud-only."""
    name = props["BucketName"]
    kwargs: dict[str, Any] = {"Bucket": name}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.head_bucket(Bucket=name)  # kept from an earlier run: creating it again would empty it (moto, us-east-1)
    except Exception as exc:
        if not _exists(exc, "404", "NoSuchBucket", "NotFound"):
            raise
        s3.create_bucket(**kwargs)
    if "VersioningConfiguration" in props:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": props["VersioningConfiguration"]["Status"]})
    if "PublicAccessBlockConfiguration" in props:
        s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"])
    rules = props.get("LifecycleConfiguration", {}).get("Rules", [])
    if rules:
        s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": [_lifecycle_rule(r) for r in rules]})
    if "BucketEncryption" in props:
        rules = [
            {"ApplyServerSideEncryptionByDefault": r["ServerSideEncryptionByDefault"]}
            for r in props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        ]
        s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
    queues = props.get("NotificationConfiguration", {}).get("QueueConfigurations", [])
    if queues:
        config = {
            "QueueConfigurations": [
                {
                    "QueueArn": q["Queue"],
                    "Events": [q["Event"]],
                    **(
                        {"Filter": {"Key": {"FilterRules": q["Filter"]["S3Key"]["Rules"]}}}
                        if "Filter" in q
                        else {}
                    ),
                }
                for q in queues
            ]
        }
        s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration=config)


def _lifecycle_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """A CloudFormation lifecycle rule in the shape of the S3 API."""
    out: dict[str, Any] = {"ID": rule["Id"], "Status": rule["Status"]}
    tags = rule.get("TagFilters", [])
    if tags:
        out["Filter"] = {"Tag": tags[0]} if len(tags) == 1 else {"And": {"Tags": tags}}
    else:
        out["Filter"] = {"Prefix": rule.get("Prefix", "")}
    if "ExpirationInDays" in rule:
        out["Expiration"] = {"Days": rule["ExpirationInDays"]}
    if "NoncurrentVersionExpirationInDays" in rule:
        out["NoncurrentVersionExpiration"] = {"NoncurrentDays": rule["NoncurrentVersionExpirationInDays"]}
    if "AbortIncompleteMultipartUpload" in rule:
        out["AbortIncompleteMultipartUpload"] = rule["AbortIncompleteMultipartUpload"]
    return out
