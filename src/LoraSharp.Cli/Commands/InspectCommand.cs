using System.CommandLine;
using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace LoraSharp.Cli.Commands;

using Text = Spectre.Console.Text; // LoraSharp.Text (tokenizers, prompts) would otherwise shadow Spectre's Text here

/// <summary><c>lorasharp inspect FILE [--all] [--limit N] [--json]</c>: what a tensor file holds, without loading its tensors.</summary>
public static class InspectCommand
{
    const int DefaultLimit = 50;
    const int MetadataPreviewChars = 600;

    public static Command Create()
    {
        var file = new Argument<string>("file") { Description = "A .safetensors file or a PyTorch checkpoint (.ckpt, .pt, .pth, .bin); the format is detected from its first bytes." };
        var all = new Option<bool>("--all") { Description = "List every tensor and print metadata values in full (default: the first --limit tensors, long values shortened)." };
        var limit = new Option<int>("--limit") { Description = "How many tensors to list without --all.", DefaultValueFactory = _ => DefaultLimit };
        var json = new Option<bool>("--json") { Description = "Print machine-readable JSON (every tensor, metadata verbatim) instead of tables." };
        var command = new Command("inspect", "Show a checkpoint or adapter file's tensors (dtype, shape), parameter count, dtype histogram and metadata.");
        command.Arguments.Add(file);
        command.Options.Add(all);
        command.Options.Add(limit);
        command.Options.Add(json);
        command.SetAction(parse => Run(
            parse.GetValue(file)!, parse.GetValue(all), parse.GetValue(limit), parse.GetValue(json),
            parse.InvocationConfiguration.Output, parse.InvocationConfiguration.Error));
        return command;
    }

    /// <summary>Runs the command; returns 0, or 2 with one line on <paramref name="error"/> when the file cannot be read.</summary>
    public static int Run(string path, bool all, int limit, bool json, TextWriter output, TextWriter error)
    {
        if (limit < 0)
        {
            error.WriteLine("error: --limit must be 0 or more");
            return 2;
        }
        Summary summary;
        AdapterSummary? adapter;
        string? checkpoint;
        try
        {
            string? hfModel = null;
            if (Directory.Exists(path) && !File.Exists(Path.Combine(path, AdapterFile.PeftConfigName)))
            {
                if (!File.Exists(Path.Combine(path, "config.json")) || Directory.Exists(Path.Combine(path, "unet")))
                {
                    // A diffusers folder: describe its components (no single tensor file to list).
                    output.Write(StableDiffusionCheckpoint.Describe(path));
                    return 0;
                }
                // A Hugging Face model folder (config.json + weights): the configuration, then the (first) weight file.
                hfModel = DescribeHfModelFolder(path);
            }
            summary = Summarize(hfModel is not null ? LoraSharp.Models.Llama.LlamaCheckpoint.WeightFiles(path)[0]
                : Directory.Exists(path) ? AdapterFile.Locate(path).TensorFile : path);
            if (hfModel is not null && !json) output.Write(hfModel);
            adapter = summary.Tensors.Any(t => AdapterKeyParser.Parse(t.Key) is not null) ? AdapterSummary.Read(path) : null;
            checkpoint = adapter is null ? DescribeCheckpoint(summary.Path) : null;
        }
        catch (LoraSharpException e)
        {
            error.WriteLine("error: " + e.Message);
            return 2;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            error.WriteLine($"error: {path}: {e.Message}");
            return 2;
        }
        if (json)
            WriteJson(summary, adapter, checkpoint, output);
        else
        {
            WriteTables(summary, all ? int.MaxValue : limit, all, output);
            if (adapter is not null) WriteAdapter(adapter, all ? int.MaxValue : limit, output);
            if (checkpoint is not null) output.Write(checkpoint);
        }
        return 0;
    }

    /// <summary>config.json of a Hugging Face model folder (Llama-family fields when it is one), its weight files and tokenizer files.</summary>
    static string DescribeHfModelFolder(string folder)
    {
        var sb = new System.Text.StringBuilder();
        var configPath = Path.Combine(folder, "config.json");
        var config = LoraSharp.Models.Llama.LlamaConfig.Load(configPath);
        var weights = LoraSharp.Models.Llama.LlamaCheckpoint.WeightFiles(folder);
        sb.AppendLine($"Hugging Face model folder {folder}");
        sb.AppendLine($"  model_type {config.ModelType}: {config.NumHiddenLayers} layers, hidden {config.HiddenSize}, MLP {config.IntermediateSize}, " +
                      $"{config.NumAttentionHeads} heads / {config.NumKeyValueHeads} key-value heads (head dim {config.HeadDim}), vocabulary {config.VocabSize}, " +
                      $"{config.MaxPositionEmbeddings} positions, RoPE θ {config.RopeTheta.ToString(CultureInfo.InvariantCulture)}{(config.TieWordEmbeddings ? ", tied embeddings" : "")}");
        sb.AppendLine($"  weights: {string.Join(", ", weights.Select(Path.GetFileName))}{(weights.Count > 1 ? " (tables below: the first shard)" : "")}");
        var tokenizerFiles = new[] { "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json" }
            .Where(f => File.Exists(Path.Combine(folder, f))).ToList();
        sb.AppendLine($"  tokenizer / generation files: {(tokenizerFiles.Count == 0 ? "none" : string.Join(", ", tokenizerFiles))}");
        sb.AppendLine();
        return sb.ToString();
    }

    sealed record DTypeStats(int Tensors, long Parameters, long Bytes);

    sealed record Summary(string Path, string Format, long FileBytes, IReadOnlyList<TensorInfo> Tensors,
        IReadOnlyDictionary<string, string> Metadata, SortedDictionary<string, DTypeStats> DTypes)
    {
        public long Parameters => Tensors.Sum(t => t.ElementCount);
    }

    static Summary Summarize(string path)
    {
        using var source = TensorFiles.Open(path);
        var tensors = source.Keys.Select(source.Info).ToList();
        var dtypes = new SortedDictionary<string, DTypeStats>(StringComparer.Ordinal);
        foreach (var g in tensors.GroupBy(t => t.DType))
            dtypes[g.Key] = new DTypeStats(g.Count(), g.Sum(t => t.ElementCount), g.Sum(t => t.ByteLength));
        var format = source switch
        {
            SafetensorsFile => "safetensors",
            PickleCheckpoint => "PyTorch zip checkpoint (torch.save)",
            _ => source.GetType().Name,
        };
        return new Summary(source.FilePath, format, new FileInfo(source.FilePath).Length, tensors,
            new Dictionary<string, string>(source.Metadata), dtypes);
    }

    static string Shape(long[] shape) => "[" + string.Join(", ", shape) + "]";

    static string Human(long n) => n switch
    {
        >= 1_000_000_000 => (n / 1e9).ToString("0.##", CultureInfo.InvariantCulture) + "B",
        >= 1_000_000 => (n / 1e6).ToString("0.##", CultureInfo.InvariantCulture) + "M",
        >= 1_000 => (n / 1e3).ToString("0.##", CultureInfo.InvariantCulture) + "K",
        _ => n.ToString(CultureInfo.InvariantCulture),
    };

    static string Bytes(long n) => n switch
    {
        >= 1L << 30 => (n / (double)(1L << 30)).ToString("0.##", CultureInfo.InvariantCulture) + " GiB",
        >= 1L << 20 => (n / (double)(1L << 20)).ToString("0.##", CultureInfo.InvariantCulture) + " MiB",
        >= 1L << 10 => (n / (double)(1L << 10)).ToString("0.##", CultureInfo.InvariantCulture) + " KiB",
        _ => n.ToString(CultureInfo.InvariantCulture) + " B",
    };

    /// <summary>A metadata value as shown: JSON objects and arrays pretty-printed, everything else as is.</summary>
    internal static string PrettyValue(string value)
    {
        var trimmed = value.TrimStart();
        if (trimmed.StartsWith('{') || trimmed.StartsWith('['))
        {
            try
            {
                var node = JsonNode.Parse(value);
                if (node is not null)
                    return node.ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping });
            }
            catch (JsonException)
            {
            }
        }
        return value;
    }

    static void WriteTables(Summary s, int limit, bool all, TextWriter output)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(output),
            Ansi = ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
            Interactive = InteractionSupport.No,
        });
        if (!ReferenceEquals(output, Console.Out) || Console.IsOutputRedirected)
            console.Profile.Width = 200;

        var facts = new Grid().AddColumn().AddColumn();
        facts.AddRow(new Text("file"), new Text(s.Path));
        facts.AddRow(new Text("format"), new Text(s.Format));
        facts.AddRow(new Text("size"), new Text($"{Bytes(s.FileBytes)} ({s.FileBytes.ToString("N0", CultureInfo.InvariantCulture)} bytes)"));
        facts.AddRow(new Text("tensors"), new Text(s.Tensors.Count.ToString(CultureInfo.InvariantCulture)));
        facts.AddRow(new Text("parameters"), new Text($"{Human(s.Parameters)} ({s.Parameters.ToString("N0", CultureInfo.InvariantCulture)})"));
        console.Write(facts);
        console.WriteLine();

        var histogram = new Table().Title("dtypes").AddColumn("dtype").AddColumn(new TableColumn("tensors").RightAligned())
            .AddColumn(new TableColumn("parameters").RightAligned()).AddColumn(new TableColumn("bytes").RightAligned());
        foreach (var (dtype, st) in s.DTypes)
            histogram.AddRow(new Text(dtype), new Text(st.Tensors.ToString(CultureInfo.InvariantCulture)),
                new Text(st.Parameters.ToString("N0", CultureInfo.InvariantCulture)), new Text(Bytes(st.Bytes)));
        console.Write(histogram);

        int shown = Math.Min(limit, s.Tensors.Count);
        var table = new Table().Title(shown < s.Tensors.Count ? $"tensors (first {shown} of {s.Tensors.Count}; --all for every one)" : "tensors")
            .AddColumn("key").AddColumn("dtype").AddColumn("shape").AddColumn(new TableColumn("parameters").RightAligned());
        foreach (var t in s.Tensors.Take(shown))
            table.AddRow(new Text(t.Key), new Text(t.DType), new Text(Shape(t.Shape)), new Text(t.ElementCount.ToString("N0", CultureInfo.InvariantCulture)));
        console.Write(table);

        if (s.Metadata.Count == 0)
        {
            console.WriteLine("no metadata");
            return;
        }
        var meta = new Table().Title($"metadata ({s.Metadata.Count} keys)").AddColumn("key").AddColumn("value");
        foreach (var (k, v) in s.Metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            var pretty = PrettyValue(v);
            if (!all && pretty.Length > MetadataPreviewChars)
                pretty = pretty[..MetadataPreviewChars] + $"… ({pretty.Length} chars; --all for the full value)";
            meta.AddRow(new Text(k), new Text(pretty));
        }
        console.Write(meta);
    }

    /// <summary>The Stable Diffusion family and components of a checkpoint, or null when the file is not one.</summary>
    static string? DescribeCheckpoint(string path)
    {
        using var source = StableDiffusionCheckpoint.Open(path);
        return StableDiffusionCheckpoint.DetectFamily(source) == StableDiffusionFamily.Unknown ? null : StableDiffusionCheckpoint.Describe(source);
    }

    static void WriteAdapter(AdapterSummary a, int limit, TextWriter output)
    {
        output.WriteLine();
        output.WriteLine($"adapter: {string.Join(" + ", a.Layouts)} layout, {a.Modules.Count} modules, made for {a.Base.Description} ({a.Base.Evidence})");
        var groups = new Table().Title("algorithms").AddColumn("algorithm").AddColumn(new TableColumn("rank").RightAligned())
            .AddColumn(new TableColumn("alpha").RightAligned()).AddColumn(new TableColumn("scale").RightAligned()).AddColumn(new TableColumn("modules").RightAligned());
        foreach (var g in a.Groups)
            groups.AddRow(new Text(g.Algorithm.ToString()), new Text(g.Rank.ToString(CultureInfo.InvariantCulture)),
                new Text(g.Alpha?.ToString("G6", CultureInfo.InvariantCulture) ?? "(= rank)"), new Text(g.Scale.ToString("G6", CultureInfo.InvariantCulture)),
                new Text(g.Count.ToString(CultureInfo.InvariantCulture)));
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors, Interactive = InteractionSupport.No });
        console.Profile.Width = 200;
        console.Write(groups);
        int shown = Math.Min(limit, a.Modules.Count);
        var modules = new Table().Title(shown < a.Modules.Count ? $"modules (first {shown} of {a.Modules.Count}; --all for every one)" : "modules")
            .AddColumn("module").AddColumn("algorithm").AddColumn(new TableColumn("rank").RightAligned()).AddColumn(new TableColumn("scale").RightAligned()).AddColumn("tensors");
        foreach (var m in a.Modules.Take(shown))
            modules.AddRow(new Text(m.Name), new Text(m.Algorithm + (m.Dora ? " + DoRA" : "")), new Text(m.Rank.ToString(CultureInfo.InvariantCulture)),
                new Text(m.Scale.ToString("G6", CultureInfo.InvariantCulture)), new Text(m.Shapes));
        console.Write(modules);
        var hashes = new Table().Title("hashes").AddColumn("hash").AddColumn("value");
        foreach (var (k, v) in a.Hashes) hashes.AddRow(new Text(k), new Text(v));
        console.Write(hashes);
    }

    static void WriteJson(Summary s, AdapterSummary? adapter, string? checkpoint, TextWriter output)
    {
        var root = new JsonObject
        {
            ["file"] = s.Path,
            ["format"] = s.Format,
            ["size_bytes"] = s.FileBytes,
            ["tensor_count"] = s.Tensors.Count,
            ["parameter_count"] = s.Parameters,
            ["dtypes"] = new JsonObject(s.DTypes.Select(kv => KeyValuePair.Create<string, JsonNode?>(kv.Key, new JsonObject
            {
                ["tensors"] = kv.Value.Tensors,
                ["parameters"] = kv.Value.Parameters,
                ["bytes"] = kv.Value.Bytes,
            }))),
            ["tensors"] = new JsonArray(s.Tensors.Select(t => (JsonNode)new JsonObject
            {
                ["key"] = t.Key,
                ["dtype"] = t.DType,
                ["shape"] = new JsonArray(t.Shape.Select(d => (JsonNode)JsonValue.Create(d)).ToArray()),
                ["parameters"] = t.ElementCount,
                ["bytes"] = t.ByteLength,
            }).ToArray()),
            ["metadata"] = new JsonObject(s.Metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal)
                .Select(kv => KeyValuePair.Create<string, JsonNode?>(kv.Key, kv.Value))),
        };
        if (checkpoint is not null) root["stable_diffusion"] = checkpoint;
        if (adapter is not null)
        {
            root["adapter"] = new JsonObject
            {
                ["layouts"] = new JsonArray(adapter.Layouts.Select(l => (JsonNode)JsonValue.Create(l)).ToArray()),
                ["base"] = new JsonObject { ["family"] = adapter.Base.Family.ToString(), ["description"] = adapter.Base.Description, ["evidence"] = adapter.Base.Evidence },
                ["hashes"] = new JsonObject(adapter.Hashes.Select(kv => KeyValuePair.Create<string, JsonNode?>(kv.Key, kv.Value))),
                ["modules"] = new JsonArray(adapter.Modules.Select(m => (JsonNode)new JsonObject
                {
                    ["module"] = m.Name,
                    ["algorithm"] = m.Algorithm.ToString(),
                    ["rank"] = m.Rank,
                    ["alpha"] = m.Alpha,
                    ["scale"] = m.Scale,
                    ["dora"] = m.Dora,
                }).ToArray()),
            };
        }
        output.WriteLine(root.ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }));
    }
}
