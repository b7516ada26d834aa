{{/*
Helpers shared by the chart's templates. Every name is prefixed with "argosy." so a
parent chart that includes this one never collides with its own helpers.
*/}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "argosy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name. Truncated so that "<fullname>-operator-namespaced"
style suffixes still fit the 63-character DNS label limit of Services and labels.
*/}}
{{- define "argosy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label (never used in selectors). */}}
{{- define "argosy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "argosy.labels" -}}
helm.sh/chart: {{ include "argosy.chart" . }}
app.kubernetes.io/name: {{ include "argosy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: argosy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of one component ("operator" or "gateway"). Stable across upgrades:
no version, no chart label (a Deployment's selector is immutable).
Usage: include "argosy.selectorLabels" (dict "ctx" $ "component" "gateway")
*/}}
{{- define "argosy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "argosy.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "argosy.componentLabels" -}}
{{ include "argosy.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* ServiceAccount names. */}}
{{- define "argosy.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "argosy.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "argosy.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (printf "%s-gateway" (include "argosy.fullname" .)) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference pinned to the chart's appVersion unless a tag or digest is given.
Usage: include "argosy.image" (dict "image" .Values.operator.image "ctx" $)
*/}}
{{- define "argosy.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* The gateway's API-key Secret name (existing or chart-created). */}}
{{- define "argosy.gateway.apiKeySecretName" -}}
{{- default (printf "%s-gateway-api-keys" (include "argosy.fullname" .)) .Values.gateway.apiKeys.existingSecret }}
{{- end }}

{{/* Labels that select the vLLM serving pods the operator creates (contract in DESIGN.md). */}}
{{- define "argosy.servingPodSelector" -}}
app.kubernetes.io/managed-by: argosy-operator
{{- end }}

{{/*
Fail rendering with a clear message when values contradict each other (the schema checks
each value alone; this checks combinations).
*/}}
{{- define "argosy.validate" -}}
{{- if and .Values.gateway.apiKeys.enabled (not .Values.gateway.apiKeys.existingSecret) (not .Values.gateway.apiKeys.keys) }}
{{- fail "gateway.apiKeys.enabled is true but neither gateway.apiKeys.existingSecret nor gateway.apiKeys.keys is set: the gateway would refuse every request" }}
{{- end }}
{{- if and .Values.gateway.httpRoute.enabled (not .Values.gateway.httpRoute.parentRefs) }}
{{- fail "gateway.httpRoute.enabled is true but gateway.httpRoute.parentRefs is empty: an HTTPRoute needs a Gateway to attach to" }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas is greater than gateway.autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (not (dig "requests" "cpu" "" .Values.gateway.resources)) }}
{{- fail "gateway.autoscaling.enabled needs gateway.resources.requests.cpu: the HPA's CPU target is a percentage of the request" }}
{{- end }}
{{- $seen := dict }}
{{- range .Values.models }}
{{- $key := printf "%s/%s" (default $.Release.Namespace .namespace) .name }}
{{- if hasKey $seen $key }}
{{- fail (printf "models: %s is listed twice" $key) }}
{{- end }}
{{- $_ := set $seen $key true }}
{{- end }}
{{- end }}

{{/* "true" when the models: value can be rendered (see templates/models.yaml), else empty. */}}
{{- define "argosy.modelsRenderable" -}}
{{- if or (not .Values.crds.enabled) (.Capabilities.APIVersions.Has "argosy.dev/v1alpha1/LLMDeployment") }}true{{ end }}
{{- end }}

{{/*
A map of labels as a label selector string: "a=b,c=d" (keys sorted).
Usage: include "argosy.labelSelectorString" $labels
*/}}
{{- define "argosy.labelSelectorString" -}}
{{- $terms := list }}
{{- range $key, $value := . }}
{{- $terms = append $terms (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $terms }}
{{- end }}
