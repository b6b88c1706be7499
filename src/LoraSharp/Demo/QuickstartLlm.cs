using System.Diagnostics;
using LoraSharp.Models.Llama;
using LoraSharp.Text;
using LoraSharp.Training.Llm;

namespace LoraSharp.Demo;

/// <summary>Where the language-model quickstart finds its inputs and writes its outputs.</summary>
public sealed record QuickstartLlmOptions
{
    /// <summary>The Axolotl-style YAML (relative: to <see cref="Root"/>; paths inside it are relative to the YAML's folder).</summary>
    public string ConfigPath { get; init; } = Path.Combine("examples", "quickstart", "llm", "lora.yaml");
    /// <summary>Held-out evaluation prompts (chat JSONL; relative: to <see cref="Root"/>).</summary>
    public string EvalPath { get; init; } = Path.Combine("examples", "quickstart", "llm", "eval.jsonl");
    /// <summary>The repository root. Default: found from the working directory.</summary>
    public string? Root { get; init; }
    /// <summary>Overrides output_dir of the YAML (relative: to <see cref="Root"/>).</summary>
    public string? OutputDir { get; init; }
    /// <summary>Overrides max_steps of the YAML (tests train shorter).</summary>
    public long? MaxSteps { get; init; }
    /// <summary>Evaluate only the first this many prompts.</summary>
    public int? EvalCount { get; init; }
}

/// <summary>What the language-model quickstart did.</summary>
public sealed record QuickstartLlmResult(string AdapterPath, string? LossCurvePath, ExactMatch.Report Base, ExactMatch.Report Lora,
    TimeSpan TrainTime, TimeSpan EvalTime, long Steps, double FinalLoss, int TrainExamples);

/// <summary>
/// The language-model half of the quickstart: the demo model (<c>models/demo/llm</c>, pretrained by
/// <see cref="DemoLlm.Pretrain"/>) never saw the task "swap". A LoRA is trained with <see cref="LlmTrainer"/> from
/// <c>examples/quickstart/llm/lora.yaml</c>; then the held-out prompts are generated greedily with the base model and
/// with the written PEFT adapter attached to a freshly loaded base, and both are scored by exact match.
/// </summary>
public sealed class QuickstartLlm(QuickstartLlmOptions options, Action<string>? log = null)
{
    readonly Action<string> _log = log ?? (_ => { });
    public event Action<LlmTrainProgress>? TrainProgress;
    /// <summary>(model: "base" or "lora", done, total).</summary>
    public event Action<string, int, int>? EvalProgress;

    /// <summary>The folder holding <c>models/demo/llm/config.json</c>, searched upwards from the working directory and the program's folder.</summary>
    public static string FindRoot()
    {
        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
            for (var d = new DirectoryInfo(start); d is not null; d = d.Parent)
                if (File.Exists(Path.Combine(d.FullName, "models", "demo", "llm", "config.json"))) return d.FullName;
        throw new LoraSharpException("cannot find models/demo/llm/config.json above the working directory; run from the LoraSharp repository (or pass --root)",
            Directory.GetCurrentDirectory());
    }

    /// <summary>Reads the YAML and applies the overrides (output folder, steps).</summary>
    public static LlmTrainConfig LoadConfig(string root, QuickstartLlmOptions o)
    {
        string Abs(string p) => Path.IsPathRooted(p) ? p : Path.GetFullPath(Path.Combine(root, p));
        var c = LlmTrainConfig.Load(Abs(o.ConfigPath));
        if (o.OutputDir is not null) c = c with { OutputDir = Abs(o.OutputDir) };
        if (o.MaxSteps is long s) c = c with { MaxSteps = s };
        return c;
    }

    public QuickstartLlmResult Run()
    {
        var root = options.Root ?? FindRoot();
        var config = LoadConfig(root, options);
        if (config.Adapter is not ("lora" or "qlora")) throw new LoraSharpException("the quickstart trains an adapter: set adapter: lora", config.SourcePath, "adapter");
        var modelDir = config.Resolve(config.BaseModel);
        var evalPath = Path.IsPathRooted(options.EvalPath) ? options.EvalPath : Path.Combine(root, options.EvalPath);
        var evalSet = TextTasks.ReadJsonl(evalPath);
        if (options.EvalCount is int k) evalSet = evalSet.Take(k).ToList();
        var tokenizer = LlmTokenizer.Load(modelDir);

        // Training prompts and evaluation prompts must not overlap.
        var trainPrompts = config.Datasets.SelectMany(d => TextTasks.ReadJsonl(config.Resolve(d.Path))).Select(e => e.Prompt).ToHashSet(StringComparer.Ordinal);
        var overlap = evalSet.Where(e => trainPrompts.Contains(e.Prompt)).ToList();
        if (overlap.Count > 0) throw new LoraSharpException($"{overlap.Count} evaluation prompt(s) are also training prompts, e.g. '{overlap[0].Prompt}'", evalPath);

        var evalClock = new Stopwatch();
        ExactMatch.Report baseReport;
        evalClock.Start();
        using (var model = LlamaCheckpoint.Load(modelDir))
            baseReport = ExactMatch.Evaluate(model, tokenizer, evalSet, (d, t) => EvalProgress?.Invoke("base", d, t));
        evalClock.Stop();
        _log($"base model: {baseReport.Correct}/{baseReport.Rows.Count} exact matches");

        var trainClock = Stopwatch.StartNew();
        LlmTrainResult r;
        using (var trainer = new LlmTrainer(config, new LlmTrainerOptions { WritePlot = true }))
        {
            _log($"training a LoRA (r {config.LoraR}, {trainer.TrainableParameters.Sum(p => p.Param.numel()):N0} trainable parameters) on {trainer.TrainRowCount} examples, {trainer.TotalSteps} steps");
            trainer.Progress += p => TrainProgress?.Invoke(p);
            r = trainer.Train();
        }
        trainClock.Stop();

        evalClock.Start();
        ExactMatch.Report loraReport;
        using (var model = LlamaCheckpoint.Load(modelDir))
        using (var host = LlmAdapters.Attach(model, [(r.OutputDir, 1.0)]))
            loraReport = ExactMatch.Evaluate(model, tokenizer, evalSet, (d, t) => EvalProgress?.Invoke("lora", d, t));
        evalClock.Stop();

        var plot = Path.Combine(r.OutputDir, "loss.png");
        int n = Math.Max(1, r.LossHistory.Count / 10);
        return new QuickstartLlmResult(r.OutputDir, File.Exists(plot) ? plot : null, baseReport, loraReport, trainClock.Elapsed, evalClock.Elapsed, r.Steps,
            r.LossHistory.TakeLast(n).Average(h => h.Loss), trainPrompts.Count);
    }
}
