using System.Text.Json;
using System.Text.Json.Nodes;
using LoraSharp.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Training.Llm;

/// <summary>One tokenized sample: input ids and labels (−100 = not trained, e.g. prompt tokens).</summary>
public sealed record LlmSample(int[] InputIds, int[] Labels)
{
    public const int IgnoreIndex = -100;

    /// <summary>Tokens whose label is trained (the first position never is: nothing predicts it).</summary>
    public int TrainedTokens => Labels.Skip(1).Count(l => l != IgnoreIndex);
}

/// <summary>One training row: several samples packed back to back (or one sample), padded to the row length.</summary>
public sealed record LlmRow(int[] InputIds, int[] Labels, int[] PositionIds, int[] SegmentIds)
{
    public int Length => InputIds.Length;
    /// <summary>Labels that count in the loss after the causal shift (labels[1..]).</summary>
    public int TrainedTokens => Labels.Skip(1).Count(l => l != LlmSample.IgnoreIndex);
}

/// <summary>A micro-batch as tensors: ids, labels, and for packed rows the position ids and block-diagonal causal mask.</summary>
public sealed class LlmBatch : IDisposable
{
    public required Tensor InputIds { get; init; }
    public required Tensor Labels { get; init; }
    public Tensor? PositionIds { get; init; }
    public Tensor? AttentionMask { get; init; }
    public required int TrainedTokens { get; init; }
    public required long Tokens { get; init; }

    public void Dispose()
    {
        InputIds.Dispose(); Labels.Dispose(); PositionIds?.Dispose(); AttentionMask?.Dispose();
    }
}

/// <summary>
/// Reads JSONL datasets (Alpaca, chat messages in OpenAI or ShareGPT form, completion), renders them with the prompt
/// or chat template, tokenizes, masks prompt labels (unless train_on_inputs), and packs or pads them into rows.
/// Malformed lines are errors naming the file and line number.
/// </summary>
public static class LlmData
{
    /// <summary>The Alpaca prompt (Stanford Alpaca / Axolotl), with and without an input.</summary>
    public static string AlpacaPrompt(string instruction, string? input) => string.IsNullOrEmpty(input)
        ? "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
          + $"### Instruction:\n{instruction}\n\n### Response:\n"
        : "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n"
          + $"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

    /// <summary>Reads and tokenizes every dataset of <paramref name="config"/>. Samples longer than sequence_len are dropped (counted).</summary>
    public static (List<LlmSample> Samples, int Dropped) Load(LlmTrainConfig config, LlmTokenizer tokenizer)
    {
        var format = ResolveChatFormat(config, tokenizer);
        var samples = new List<LlmSample>();
        int dropped = 0;
        foreach (var ds in config.Datasets)
        {
            var path = config.Resolve(ds.Path);
            if (!File.Exists(path)) throw new LoraSharpException("dataset file not found", path, "datasets.path");
            int lineNo = 0;
            foreach (var line in File.ReadLines(path))
            {
                lineNo++;
                if (string.IsNullOrWhiteSpace(line)) continue;
                JsonObject obj;
                try { obj = JsonNode.Parse(line) as JsonObject ?? throw new LoraSharpException($"line {lineNo}: expected a JSON object", path); }
                catch (JsonException e) { throw new LoraSharpException($"line {lineNo}: invalid JSON: {e.Message}", path, inner: e); }
                LlmSample sample;
                try { sample = Encode(obj, ds, format, tokenizer, config.TrainOnInputs); }
                catch (LoraSharpException e) when (e.FilePath is null) { throw new LoraSharpException($"line {lineNo}: {e.Problem}", path, e.Key, e); }
                if (sample.InputIds.Length > config.SequenceLen || sample.InputIds.Length < 2) { dropped++; continue; }
                samples.Add(sample);
            }
        }
        if (samples.Count == 0) throw new LoraSharpException($"no usable samples (all {dropped} longer than sequence_len {config.SequenceLen} or empty)", config.SourcePath, "datasets");
        return (samples, dropped);
    }

    /// <summary>The chat format from chat_template (tokenizer_default = the model's own), null when the model has none.</summary>
    public static ChatFormat? ResolveChatFormat(LlmTrainConfig config, LlmTokenizer tokenizer) =>
        config.ChatTemplate is "tokenizer_default" or "" ? tokenizer.ChatFormat : ChatTemplates.Parse(config.ChatTemplate);

    /// <summary>Tokenizes one JSON line.</summary>
    public static LlmSample Encode(JsonObject obj, LlmDatasetConfig ds, ChatFormat? format, LlmTokenizer tokenizer, bool trainOnInputs)
    {
        switch (ds.Type)
        {
            case LlmDatasetType.Alpaca:
            {
                var prompt = AlpacaPrompt(Field(obj, "instruction"), OptField(obj, "input"));
                var output = Field(obj, "output");
                var promptIds = tokenizer.Encode(prompt, addBos: true, addEos: false);
                var responseIds = tokenizer.Tokenizer.Encode(output).ToList();
                if (tokenizer.EosId is int eos) responseIds.Add(eos);
                return Combine([(promptIds, trainOnInputs), (responseIds, true)]);
            }
            case LlmDatasetType.Completion:
            {
                var ids = tokenizer.Encode(Field(obj, "text"), addBos: true, addEos: true);
                return Combine([(ids, true)]);
            }
            default:
            {
                if (format is not ChatFormat f)
                    throw new LoraSharpException("the model has no known chat template; set chat_template: chatml, llama2 or llama3", key: "chat_template");
                var messages = Messages(obj, ds.FieldMessages);
                // Render growing prefixes: the tokens a turn adds belong to it; assistant turns are trained, not their header.
                var parts = new List<(IReadOnlyList<int>, bool)>();
                IReadOnlyList<int> done = [];
                for (int i = 0; i < messages.Count; i++)
                {
                    bool assistant = messages[i].Role == "assistant";
                    if (assistant)
                    {
                        var header = tokenizer.EncodeChat(messages.Take(i).ToList(), addGenerationPrompt: true, format: f);
                        parts.Add((Suffix(done, header), trainOnInputs));
                        done = header;
                    }
                    var full = tokenizer.EncodeChat(messages.Take(i + 1).ToList(), addGenerationPrompt: false, format: f);
                    parts.Add((Suffix(done, full), assistant || trainOnInputs));
                    done = full;
                }
                return Combine(parts);
            }
        }
    }

    /// <summary>The tokens of <paramref name="full"/> after its common prefix with <paramref name="prefix"/>.</summary>
    static IReadOnlyList<int> Suffix(IReadOnlyList<int> prefix, IReadOnlyList<int> full)
    {
        int common = 0;
        while (common < prefix.Count && common < full.Count && prefix[common] == full[common]) common++;
        if (common < prefix.Count)
            throw new LoraSharpException("the chat template does not render conversations as growing prefixes; cannot split turns", key: "chat_template");
        return full.Skip(common).ToList();
    }

    static LlmSample Combine(IEnumerable<(IReadOnlyList<int> Ids, bool Train)> parts)
    {
        var ids = new List<int>();
        var labels = new List<int>();
        foreach (var (p, train) in parts)
        {
            ids.AddRange(p);
            labels.AddRange(train ? p : Enumerable.Repeat(LlmSample.IgnoreIndex, p.Count));
        }
        return new LlmSample(ids.ToArray(), labels.ToArray());
    }

    static List<ChatMessage> Messages(JsonObject obj, string? field)
    {
        var name = field ?? (obj.ContainsKey("messages") ? "messages" : obj.ContainsKey("conversations") ? "conversations" : null)
            ?? throw new LoraSharpException("expected a 'messages' (role/content) or 'conversations' (from/value) list", key: "messages");
        if (obj[name] is not JsonArray arr) throw new LoraSharpException($"'{name}' must be a list of turns", key: name);
        var list = new List<ChatMessage>();
        foreach (var item in arr)
        {
            if (item is not JsonObject turn) throw new LoraSharpException($"each turn of '{name}' must be an object", key: name);
            string role, content;
            if (turn.ContainsKey("role")) { role = Field(turn, "role"); content = Field(turn, "content"); }
            else if (turn.ContainsKey("from")) { role = Field(turn, "from"); content = Field(turn, "value"); }
            else throw new LoraSharpException($"a turn of '{name}' needs role/content or from/value", key: name);
            role = role switch
            {
                "human" or "user" => "user",
                "gpt" or "assistant" or "model" => "assistant",
                "system" => "system",
                _ => throw new LoraSharpException($"unknown role '{role}' (expected system, user/human, assistant/gpt)", key: name),
            };
            list.Add(new ChatMessage(role, content));
        }
        if (!list.Any(m => m.Role == "assistant")) throw new LoraSharpException("the conversation has no assistant turn to train on", key: name);
        return list;
    }

    static string Field(JsonObject obj, string name) =>
        obj[name] is JsonValue v && v.TryGetValue<string>(out var s) ? s
        : throw new LoraSharpException($"expected a string field '{name}'", key: name);

    static string? OptField(JsonObject obj, string name) =>
        obj[name] is null ? null : obj[name] is JsonValue v && v.TryGetValue<string>(out var s) ? s
        : throw new LoraSharpException($"field '{name}' must be a string", key: name);

    /// <summary>Deterministic Fisher–Yates shuffle of indices 0..n-1 with <paramref name="seed"/>.</summary>
    public static int[] Permutation(int n, int seed)
    {
        var idx = Enumerable.Range(0, n).ToArray();
        var rng = new Random(seed);
        for (int i = n - 1; i > 0; i--)
        {
            int j = rng.Next(i + 1);
            (idx[i], idx[j]) = (idx[j], idx[i]);
        }
        return idx;
    }

    /// <summary>
    /// Packs samples in order into rows of <paramref name="length"/> tokens (first fit in order: a sample that does
    /// not fit starts a new row). Position ids restart at 0 for each sample; segment ids number the samples (0 =
    /// padding); the first label of every sample is masked so no loss crosses a sample boundary.
    /// </summary>
    public static List<LlmRow> Pack(IReadOnlyList<LlmSample> samples, int length, int padId)
    {
        var rows = new List<LlmRow>();
        var ids = new List<int>(); var labels = new List<int>(); var pos = new List<int>(); var seg = new List<int>();
        void Flush()
        {
            if (ids.Count == 0) return;
            int pad = length - ids.Count;
            ids.AddRange(Enumerable.Repeat(padId, pad)); labels.AddRange(Enumerable.Repeat(LlmSample.IgnoreIndex, pad));
            pos.AddRange(Enumerable.Range(0, pad)); seg.AddRange(Enumerable.Repeat(0, pad));
            rows.Add(new LlmRow(ids.ToArray(), labels.ToArray(), pos.ToArray(), seg.ToArray()));
            ids.Clear(); labels.Clear(); pos.Clear(); seg.Clear();
        }
        int segment = 0;
        foreach (var s in samples)
        {
            if (ids.Count + s.InputIds.Length > length) { Flush(); segment = 0; }
            segment++;
            ids.AddRange(s.InputIds);
            labels.Add(LlmSample.IgnoreIndex);
            labels.AddRange(s.Labels.Skip(1));
            pos.AddRange(Enumerable.Range(0, s.InputIds.Length));
            seg.AddRange(Enumerable.Repeat(segment, s.InputIds.Length));
        }
        Flush();
        return rows;
    }

    /// <summary>One row per sample (no packing); padding happens per micro-batch.</summary>
    public static List<LlmRow> Unpacked(IReadOnlyList<LlmSample> samples) =>
        samples.Select(s => new LlmRow(s.InputIds, s.Labels, Enumerable.Range(0, s.InputIds.Length).ToArray(), Enumerable.Repeat(1, s.InputIds.Length).ToArray())).ToList();

    /// <summary>
    /// Tensors for a micro-batch. Rows are right-padded to the longest; when <paramref name="packed"/>, position ids
    /// and the block-diagonal causal mask <c>[batch, seq, seq]</c> (query i attends key j when both are in the same
    /// sample and j ≤ i; padding attends only itself) are included.
    /// </summary>
    public static LlmBatch Collate(IReadOnlyList<LlmRow> rows, int padId, bool packed, Device device)
    {
        int len = rows.Max(r => r.Length), b = rows.Count;
        var ids = new long[b * len]; var labels = new long[b * len]; var pos = new long[b * len]; var seg = new long[b * len];
        for (int i = 0; i < b; i++)
        {
            var r = rows[i];
            for (int t = 0; t < len; t++)
            {
                int k = i * len + t;
                bool real = t < r.Length;
                ids[k] = real ? r.InputIds[t] : padId;
                labels[k] = real ? r.Labels[t] : LlmSample.IgnoreIndex;
                pos[k] = real ? r.PositionIds[t] : t;
                seg[k] = real ? r.SegmentIds[t] : 0;
            }
        }
        using var scope = NewDisposeScope();
        var idsT = torch.tensor(ids, [b, len], dtype: ScalarType.Int64, device: device);
        var labelsT = torch.tensor(labels, [b, len], dtype: ScalarType.Int64, device: device);
        Tensor? posT = null, maskT = null;
        if (packed)
        {
            posT = torch.tensor(pos, [b, len], dtype: ScalarType.Int64, device: device);
            var segT = torch.tensor(seg, [b, len], dtype: ScalarType.Int64, device: device);
            var same = segT.unsqueeze(2).eq(segT.unsqueeze(1)).logical_and(segT.unsqueeze(2).ne(0));
            var causal = torch.ones([len, len], dtype: ScalarType.Bool, device: device).tril();
            var eye = torch.eye(len, dtype: ScalarType.Bool, device: device);
            maskT = same.logical_and(causal).logical_or(eye).MoveToOuterDisposeScope();
            posT.MoveToOuterDisposeScope();
        }
        return new LlmBatch
        {
            InputIds = idsT.MoveToOuterDisposeScope(), Labels = labelsT.MoveToOuterDisposeScope(), PositionIds = posT, AttentionMask = maskT,
            TrainedTokens = rows.Sum(r => r.TrainedTokens), Tokens = rows.Sum(r => (long)r.SegmentIds.Count(s => s != 0)),
        };
    }
}
