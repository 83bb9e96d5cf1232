{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "postback.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "postback.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's resources: (dict "root" $ "component" "ingress") */}}
{{- define "postback.componentName" -}}
{{- printf "%s-%s" (include "postback.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" -}}
{{- end -}}

{{- define "postback.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "postback.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "postback.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "postback.secretName" -}}
{{- default (printf "%s-secrets" (include "postback.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "postback.configMapName" -}}
{{- printf "%s-config" (include "postback.fullname" .) -}}
{{- end -}}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{- define "postback.selectorLabels" -}}
app.kubernetes.io/name: {{ include "postback.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "postback.labels" -}}
helm.sh/chart: {{ include "postback.chart" . }}
{{ include "postback.selectorLabels" . }}
app.kubernetes.io/version: {{ include "postback.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: postback
{{- end -}}

{{/* (dict "root" $ "component" "ingress") */}}
{{- define "postback.componentSelectorLabels" -}}
{{ include "postback.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "postback.componentLabels" -}}
{{ include "postback.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image -------------------------------------------------------------------------------- */}}

{{- define "postback.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "postback.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "postback.imageTag" .) -}}
{{- end -}}
{{- end -}}

{{/* Settings ----------------------------------------------------------------------------- */}}

{{/* The public base URL: publicUrl, else the first Ingress host, else empty. */}}
{{- define "postback.derivedUrl" -}}
{{- if and .Values.ingress.enabled .Values.ingress.hosts -}}
{{- printf "%s://%s" (ternary "https" "http" (gt (len .Values.ingress.tls) 0)) (first .Values.ingress.hosts) -}}
{{- end -}}
{{- end -}}

{{/* A `config`-shaped map (camelCase keys) as POSTBACK_* variables; nulls are left out. */}}
{{- define "postback.configVars" -}}
{{- $out := dict -}}
{{- range $key, $value := . -}}
{{- if not (kindIs "invalid" $value) -}}
{{- $_ := set $out (printf "POSTBACK_%s" ($key | snakecase | upper)) (toString $value) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* Every non-secret POSTBACK_* setting shared by the services, as a YAML map. */}}
{{- define "postback.settings" -}}
{{- $v := .Values -}}
{{- $s := dict
  "POSTBACK_KAFKA_BOOTSTRAP" $v.kafka.bootstrap
  "POSTBACK_TOPIC_PREFIX" $v.kafka.topicPrefix
  "POSTBACK_TOPIC_PARTITIONS" (toString (int $v.kafka.partitions))
  "POSTBACK_TOPIC_REPLICATION" (toString (int $v.kafka.replicationFactor))
  "POSTBACK_HTTP_HOST" "0.0.0.0"
  "POSTBACK_HTTP_PORT" "8080"
  "POSTBACK_MIGRATE_ON_START" (ternary "false" "true" $v.migrations.enabled)
-}}
{{- if not $v.database.urlSecret.name -}}
{{- $params := ternary (printf "?%s" $v.database.params) "" (ne $v.database.params "") -}}
{{- $_ := set $s "POSTBACK_DATABASE_URL" (printf "postgresql://%s@%s:%d/%s%s" $v.database.user $v.database.host (int $v.database.port) $v.database.name $params) -}}
{{- end -}}
{{- $public := default (include "postback.derivedUrl" .) $v.publicUrl -}}
{{- if $public -}}
{{- $_ := set $s "POSTBACK_PUBLIC_URL" $public -}}
{{- end -}}
{{- $callback := default (include "postback.derivedUrl" .) $v.callbackUrl -}}
{{- if $callback -}}
{{- $_ := set $s "POSTBACK_CALLBACK_URL" $callback -}}
{{- end -}}
{{- $s = merge (include "postback.configVars" $v.config | fromYaml) $s -}}
{{- toYaml $s -}}
{{- end -}}

{{/* The secret-backed variables, as a list of EnvVar. */}}
{{- define "postback.secretEnv" -}}
{{- $v := .Values -}}
{{- $name := include "postback.secretName" . -}}
{{- $existing := ne $v.secrets.existingSecret "" -}}
{{- if or $existing $v.secrets.operatorToken }}
- name: POSTBACK_OPERATOR_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $v.secrets.operatorTokenKey }}
      optional: true
{{- end }}
{{- if or $existing $v.secrets.secretKey }}
- name: POSTBACK_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $v.secrets.secretKeyKey }}
{{- end }}
{{- if $v.database.urlSecret.name }}
- name: POSTBACK_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.database.urlSecret.name }}
      key: {{ $v.database.urlSecret.key }}
{{- else if or $existing $v.secrets.databasePassword }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $v.secrets.databasePasswordKey }}
      optional: true
{{- end }}
{{- end -}}

{{/* A service's env: secrets, its own config overrides, then extraEnv: (dict "root" $ "svc" $svc) */}}
{{- define "postback.serviceEnv" -}}
{{ include "postback.secretEnv" .root | trim }}
{{- range $key, $value := (include "postback.configVars" .svc.config | fromYaml) }}
- name: {{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- with .svc.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Whether the chart creates the Secret. */}}
{{- define "postback.createSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.operatorToken .Values.secrets.secretKey .Values.secrets.databasePassword) -}}
true
{{- end -}}
{{- end -}}

{{/* Pods -------------------------------------------------------------------------------- */}}

{{/* Seconds a service needs to stop: preStop sleep + drain + margin, rounded up. */}}
{{- define "postback.terminationGrace" -}}
{{- $root := .root -}}
{{- $drain := default $root.Values.config.shutdownGraceSeconds (index .svc.config "shutdownGraceSeconds") -}}
{{- $drain = default 20 $drain -}}
{{- add (int (ceil (float64 $drain))) (int .svc.preStopSleepSeconds) (int $root.Values.podDefaults.terminationGraceMarginSeconds) -}}
{{- end -}}

{{/* The effective partition count of a topic key: (dict "root" $ "topic" "calls") */}}
{{- define "postback.topicPartitions" -}}
{{- $t := index .root.Values.kafka.topics .topic -}}
{{- if kindIs "invalid" $t.partitions -}}
{{- int .root.Values.kafka.partitions -}}
{{- else -}}
{{- int $t.partitions -}}
{{- end -}}
{{- end -}}

{{/* Whether a service scales with KEDA: (dict "root" $ "svc" $svc) */}}
{{- define "postback.usesKeda" -}}
{{- if and .root.Values.keda.enabled .svc.consumer .svc.autoscaling.enabled .svc.consumerGroup -}}
true
{{- end -}}
{{- end -}}

{{- define "postback.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.podDefaults.tmpSizeLimit }}
{{- end -}}

{{/* Checks that fail the render with a clear message. */}}
{{- define "postback.validate" -}}
{{- $root := . -}}
{{- if not .Values.kafka.strimzi.enabled -}}
{{- range $topic, $t := .Values.kafka.topics -}}
{{- if not (kindIs "invalid" $t.partitions) -}}
{{- fail (printf "kafka.topics.%s.partitions applies to Strimzi KafkaTopics only: without kafka.strimzi.enabled the topics Job gives every topic kafka.partitions; set that instead" $topic) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* The consumer groups read calls, deliveries and the ledger (the DLQ is for operators;
       compacted topics are followed by every replica): the smallest of them caps replicas. */ -}}
{{- $partitions := int (include "postback.topicPartitions" (dict "root" $ "topic" "calls")) -}}
{{- $capTopic := "postback.calls" -}}
{{- range $topic := list "deliveries" "ledger" -}}
{{- $n := int (include "postback.topicPartitions" (dict "root" $root "topic" $topic)) -}}
{{- if lt $n $partitions -}}
{{- $partitions = $n -}}
{{- $capTopic = printf "postback.%s" $topic -}}
{{- end -}}
{{- end -}}
{{- range $name, $svc := .Values.services -}}
{{- if and $svc.enabled $svc.consumer -}}
{{- $most := int $svc.replicas -}}
{{- if $svc.autoscaling.enabled -}}
{{- $most = int $svc.autoscaling.maxReplicas -}}
{{- end -}}
{{- if gt $most $partitions -}}
{{- fail (printf "services.%s: up to %d replicas, but %s has %d partitions; a consumer group cannot use more members than partitions (the rest sit idle). Lower replicas/autoscaling.maxReplicas or raise the partitions." $name $most $capTopic $partitions) -}}
{{- end -}}
{{- end -}}
{{- if and $svc.autoscaling.enabled (gt (int $svc.autoscaling.minReplicas) (int $svc.autoscaling.maxReplicas)) -}}
{{- fail (printf "services.%s.autoscaling: minReplicas %d is above maxReplicas %d" $name (int $svc.autoscaling.minReplicas) (int $svc.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.secrets.existingSecret (or .Values.secrets.operatorToken .Values.secrets.secretKey .Values.secrets.databasePassword) -}}
{{- fail "secrets: give either secrets.existingSecret or the secret values, not both" -}}
{{- end -}}
{{- if not (or .Values.secrets.existingSecret .Values.secrets.secretKey) -}}
{{- fail "secrets: set secrets.existingSecret (a Secret holding the master key under secrets.secretKeyKey) or secrets.secretKey. Every signing secret and callback token derives from that key, and the services refuse to start without one: generate it with `openssl rand -base64 48` and keep it." -}}
{{- end -}}
{{- if and .Values.secrets.secretKey (lt (len .Values.secrets.secretKey) 32) -}}
{{- fail "secrets.secretKey: at least 32 characters (`openssl rand -base64 48`)" -}}
{{- end -}}
{{- end -}}

{{/* A hook Job running one `postback` command: (dict "root" $ "component" "migrate"
     "args" (list "migrate") "job" .Values.migrations "weight" "-5") */}}
{{- define "postback.hookJob" -}}
{{- $root := .root -}}
{{- $ctx := dict "root" $root "component" .component -}}
{{- $pd := $root.Values.podDefaults -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "postback.componentName" $ctx }}
  labels:
    {{- include "postback.componentLabels" $ctx | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: {{ .weight | quote }}
    # A failed Job stays for `kubectl logs` until the next attempt replaces it.
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  backoffLimit: {{ .job.backoffLimit }}
  activeDeadlineSeconds: {{ .job.activeDeadlineSeconds }}
  template:
    metadata:
      labels:
        {{- include "postback.componentLabels" $ctx | nindent 8 }}
    spec:
      restartPolicy: Never
      {{- with $root.Values.jobServiceAccountName }}
      serviceAccountName: {{ . }}
      {{- end }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $pd.podSecurityContext | nindent 8 }}
      {{- with $pd.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pd.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "postback.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: {{ toJson .args }}
          # Hooks run before the release's ConfigMap exists, so the same settings are inline.
          env:
            {{- range $key, $value := (include "postback.settings" $root | fromYaml) }}
            - name: {{ $key }}
              value: {{ $value | quote }}
            {{- end }}
            {{- include "postback.secretEnv" $root | trim | nindent 12 }}
          resources:
            {{- toYaml .job.resources | nindent 12 }}
          securityContext:
            {{- toYaml $pd.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        {{- include "postback.tmpVolume" $root | nindent 8 }}
{{- end -}}

{{/* Egress every Postback pod needs: DNS, Kafka, PostgreSQL, the OTLP collector. */}}
{{- define "postback.commonEgress" -}}
{{- $np := .Values.networkPolicy -}}
# DNS
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
# Kafka
- ports:
    {{- range $np.kafkaPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $np.kafkaTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# PostgreSQL
- ports:
    {{- range $np.databasePorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $np.databaseTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- if $np.otlpPorts }}
# OpenTelemetry collector
- ports:
    {{- range $np.otlpPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- end -}}
