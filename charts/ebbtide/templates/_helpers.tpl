{{/* Names, labels and the checks every template relies on. */}}

{{- define "ebbtide.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ebbtide.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ebbtide.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ebbtide.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ebbtide.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ebbtide.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "ebbtide.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ebbtide.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name the ServiceAccount the operator runs as" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ebbtide.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "ebbtide.stateClaimName" -}}
{{- default (printf "%s-state" (include "ebbtide.fullname" .)) .Values.stateDir.persistentVolumeClaim.existingClaim }}
{{- end }}

{{- /*
The NBD ports as a list (empty when the endpoint is off); fails when the range
leaves 1024-65535 or holds the metrics or liveness port.
*/}}
{{- define "ebbtide.endpointPorts" -}}
{{- if .Values.endpoint.enabled }}
{{- $last := include "ebbtide.lastEndpointPort" . | int }}
{{- toJson (untilStep (int .Values.endpoint.ports.first) (add1 $last | int) 1) }}
{{- else }}
{{- toJson list }}
{{- end }}
{{- end }}

{{- define "ebbtide.lastEndpointPort" -}}
{{- $first := int .Values.endpoint.ports.first }}
{{- $last := add $first (int .Values.endpoint.ports.count) -1 | int }}
{{- if gt $last 65535 }}
{{- fail (printf "endpoint.ports: %d ports from %d end at %d, past 65535: lower endpoint.ports.first or endpoint.ports.count" (int .Values.endpoint.ports.count) $first $last) }}
{{- end }}
{{- range $name, $port := dict "metrics.port" (ternary (int .Values.metrics.port) 0 .Values.metrics.enabled) "liveness.port" (ternary (int .Values.liveness.port) 0 .Values.liveness.enabled) }}
{{- if and (ge $port $first) (le $port $last) }}
{{- fail (printf "%s %d is inside the NBD port range endpoint.ports %d-%d: choose another port or move the range" $name $port $first $last) }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.enabled .Values.liveness.enabled (eq (int .Values.metrics.port) (int .Values.liveness.port)) }}
{{- fail (printf "metrics.port and liveness.port are both %d: give them different ports" (int .Values.metrics.port)) }}
{{- end }}
{{- $last }}
{{- end }}

{{- /* The host name in NBD export URLs: endpoint.advertise, or the Service's cluster DNS name. */}}
{{- define "ebbtide.advertise" -}}
{{- default (printf "%s.%s.svc" (include "ebbtide.fullname" .) .Release.Namespace) .Values.endpoint.advertise }}
{{- end }}

{{- /*
RBAC rules for the namespaced resources the operator uses; docs/helm.md lists
them and tests/helm/test_rbac.py checks them against the operator's code.
*/}}
{{- define "ebbtide.namespacedRules" -}}
# The custom resources: Kopf lists and watches them, and patches finalizers and
# its ebbtide.io/ annotations; handlers read them.
- apiGroups: [ebbtide.io]
  resources: [virtualprotectiongroups, storageaccounts, checkpoints, recoveries]
  verbs: [get, list, watch, patch]
# Status is written through the /status subresource.
- apiGroups: [ebbtide.io]
  resources: [virtualprotectiongroups/status, storageaccounts/status, checkpoints/status, recoveries/status]
  verbs: [patch]
# Restore Jobs and PVCs name their Recovery as owner with blockOwnerDeletion, which
# needs this where the OwnerReferencesPermissionEnforcement admission plugin is on.
- apiGroups: [ebbtide.io]
  resources: [recoveries/finalizers]
  verbs: [update]
# StorageAccount credentials, indexed in memory by Kopf.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
# Events (kopf.info / kopf.warn) on the resources; Kopf posts core Events.
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
# Recoveries to PersistentVolumeClaims: the claims (created, disowned by a patch
# when kept, deleted on rollback) and the restore Jobs that fill them.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, delete]
{{- end }}

{{- define "ebbtide.clusterRules" -}}
# Kopf's resource discovery: it lists and watches the CRDs to find its kinds.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.watchNamespaces }}
# Kopf observes namespaces when it serves a list of them rather than all.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}
