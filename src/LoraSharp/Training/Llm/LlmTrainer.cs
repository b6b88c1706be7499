using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Models.Llama;
using LoraSharp.Text;
using LoraSharp.Training.Optim;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Training.Llm;

/// <summary>What the trainer reports after each optimizer step (and after each evaluation).</summary>
public sealed record LlmTrainProgress(
    long Step, long TotalSteps, double Loss, double LearningRate, double TokensPerSecond, TimeSpan Elapsed, TimeSpan Eta,
    double? EvalLoss, double GradNorm)
{
    public double? EvalPerplexity => EvalLoss is double l ? Math.Exp(l) : null;
}

/// <summary>The outcome of <see cref="LlmTrainer.Train"/>.</summary>
public sealed record LlmTrainResult(long Steps, double FinalLoss, double? FinalEvalLoss, string OutputDir, IReadOnlyList<(long Step, double Loss)> LossHistory,
    IReadOnlyList<(long Step, double Loss)> EvalHistory)
{
    public double? FinalEvalPerplexity => FinalEvalLoss is double l ? Math.Exp(l) : null;
}

/// <summary>Options that are not part of the YAML config.</summary>
public sealed record LlmTrainerOptions
{
    /// <summary>Stop after this many optimizer steps in this run (the schedule still spans the full run): simulates an interruption.</summary>
    public long? StopAfterSteps { get; init; }
    /// <summary>Collect garbage every this many steps (bounds RSS: some TorchSharp handles are released by finalizers). 0 = never.</summary>
    public int CollectEvery { get; init; } = 10;
    public Device? Device { get; init; }
    /// <summary>Write the loss-curve PNG at the end.</summary>
    public bool WritePlot { get; init; } = true;
}

/// <summary>
/// Fine-tunes a Llama-family model per an <see cref="LlmTrainConfig"/>: LoRA / DoRA / rsLoRA adapters on full-precision
/// (lora) or NF4 (qlora) base linears, or full fine-tuning; AdamW or 8-bit AdamW; warmup + cosine/linear/constant;
/// gradient accumulation (token-weighted) and global-norm clipping; gradient checkpointing; bf16 compute (bf16 base
/// weights and matmuls, fp32 master adapter weights, fp32 norms statistics and loss); evaluation loss/perplexity;
/// atomic checkpoints with everything needed to resume exactly.
/// </summary>
public sealed class LlmTrainer : IDisposable
{
    public const string AdapterName = "default";

    readonly LlmTrainOptionsHolder _o;
    readonly List<LlmRow> _trainRows, _evalRows;
    readonly List<(string Name, Parameter Param)> _trainable;
    readonly ITrainingOptimizer _optimizer;
    readonly LrSchedule _schedule;
    readonly int _padId;
    readonly Device _device;
    readonly List<(long, double)> _lossHistory = [];
    readonly List<(long, double)> _evalHistory = [];
    long _step;

    sealed record LlmTrainOptionsHolder(LlmTrainConfig Config, LlmTrainerOptions Options);

    public LlmTrainConfig Config => _o.Config;
    double LearningRateAt(long step) => Config.LearningRate * _schedule.Factor(step);
    public LlmBaseModel Base { get; }
    public LlamaForCausalLM Model => Base.Model;
    public LlmTokenizer Tokenizer { get; }
    /// <summary>The adapter host (null for full fine-tuning).</summary>
    public AdapterHost? Host { get; }
    public ITrainingOptimizer Optimizer => _optimizer;
    public long TotalSteps { get; }
    public long StepsPerEpoch { get; }
    public long Step => _step;
    public int DroppedSamples { get; }
    public int TrainRowCount => _trainRows.Count;
    public int EvalRowCount => _evalRows.Count;
    public IReadOnlyList<(string Name, Parameter Param)> TrainableParameters => _trainable;
    public string OutputDir { get; }

    /// <summary>Raised after every optimizer step.</summary>
    public event Action<LlmTrainProgress>? Progress;

    public LlmTrainer(LlmTrainConfig config, LlmTrainerOptions? options = null)
    {
        options ??= new LlmTrainerOptions();
        _o = new(config, options);
        _device = options.Device ?? torch.CPU;
        OutputDir = config.Resolve(config.OutputDir);
        var modelDir = config.Resolve(config.BaseModel);
        var dtype = config.Bf16 ? ScalarType.BFloat16 : ScalarType.Float32;
        Tokenizer = LlmTokenizer.Load(modelDir);
        _padId = Tokenizer.PadId ?? Tokenizer.EosId ?? 0;

        // Data: tokenize, split off the eval set and pack with a seeded order.
        var (samples, dropped) = LlmData.Load(config, Tokenizer);
        DroppedSamples = dropped;
        var order = LlmData.Permutation(samples.Count, config.Seed);
        int evalCount = config.ValSetSize <= 0 ? 0 : config.ValSetSize < 1 ? (int)Math.Ceiling(config.ValSetSize * samples.Count) : (int)config.ValSetSize;
        if (evalCount >= samples.Count) throw new LoraSharpException($"val_set_size leaves no training samples ({samples.Count} in all)", config.SourcePath, "val_set_size");
        var evalSamples = order.Take(evalCount).Select(i => samples[i]).ToList();
        var trainSamples = order.Skip(evalCount).Select(i => samples[i]).ToList();
        _trainRows = config.SamplePacking ? LlmData.Pack(trainSamples, config.SequenceLen, _padId) : LlmData.Unpacked(trainSamples);
        _evalRows = config.SamplePacking ? LlmData.Pack(evalSamples, config.SequenceLen, _padId) : LlmData.Unpacked(evalSamples);

        long microPerEpoch = (_trainRows.Count + config.MicroBatchSize - 1) / config.MicroBatchSize;
        StepsPerEpoch = (microPerEpoch + config.GradientAccumulationSteps - 1) / config.GradientAccumulationSteps;
        TotalSteps = config.MaxSteps ?? (long)Math.Ceiling(config.NumEpochs * StepsPerEpoch);
        long warmup = LrSchedule.HuggingFaceWarmupSteps(config.WarmupSteps, config.WarmupRatio, TotalSteps);
        _schedule = LrSchedule.Create(LrSchedule.NameOf(config.LrScheduler), warmup, TotalSteps, config.LearningRate);

        Base = LlmModelLoader.Load(modelDir, dtype, config.IsQLora, _device);
        try
        {
            torch.manual_seed(config.Seed);
            if (config.IsFullFineTune)
            {
                _trainable = [];
                foreach (var (name, p) in LlmBaseModel.DistinctParameters(Model))
                {
                    p.requires_grad = true;
                    _trainable.Add((name, p));
                }
            }
            else
            {
                Host = new AdapterHost(Model);
                if (Base.Quantized is { } nf4) Host.DequantizedWeight = nf4.Dequantize; // DoRA on the NF4 base (QLoRA + use_dora)
                Host.FreezeBase();
                var selector = config.LoraTargetLinear
                    ? ModuleSelector.Glob("*").ExcludeExact("lm_head")
                    : ModuleSelector.Suffix([.. config.LoraTargetModules]);
                var attached = Host.Create(AdapterName, new AdapterConfig
                {
                    Rank = config.LoraR, Alpha = config.LoraAlpha, RsLora = config.UseRslora, Dora = config.UseDora ? DoraKind.Peft : DoraKind.None,
                    Dropout = new AdapterDropout { Input = config.LoraDropout }, Convention = ScaleConvention.Peft, DType = ScalarType.Float32,
                }, selector);
                if (config.Bf16) foreach (var a in attached.Modules) a.ComputeDType = ScalarType.BFloat16;
                _trainable = Host.NamedTrainableParameters(AdapterName).Select(p => (p.Name, p.Param)).ToList();
            }
            var group = new Optim.ParamGroup("params", _trainable.Select(t => t.Param).ToList(), config.LearningRate);
            _optimizer = new AdamWOptimizer([group], (0.9, 0.999), eps: 1e-8, weightDecay: config.WeightDecay, eightBit: config.Uses8BitOptimizer);
            LlmGradientCheckpoint.Set(Model, config.GradientCheckpointing);
        }
        catch
        {
            Host?.Dispose();
            Base.Dispose();
            throw;
        }
    }

    /// <summary>Micro-batches of optimizer step <paramref name="step"/>: a pure function of the step, the seed and the data.</summary>
    public IReadOnlyList<IReadOnlyList<LlmRow>> MicroBatchesOf(long step)
    {
        var c = Config;
        long epoch = step / StepsPerEpoch, inEpoch = step % StepsPerEpoch;
        var order = LlmData.Permutation(_trainRows.Count, unchecked(c.Seed + (int)epoch * 7919 + 1));
        long microPerEpoch = (_trainRows.Count + c.MicroBatchSize - 1) / c.MicroBatchSize;
        var list = new List<IReadOnlyList<LlmRow>>();
        for (long m = inEpoch * c.GradientAccumulationSteps; m < Math.Min(microPerEpoch, (inEpoch + 1) * c.GradientAccumulationSteps); m++)
        {
            var rows = new List<LlmRow>();
            for (long r = m * c.MicroBatchSize; r < Math.Min(_trainRows.Count, (m + 1) * c.MicroBatchSize); r++) rows.Add(_trainRows[order[r]]);
            list.Add(rows);
        }
        return list;
    }

    /// <summary>Summed cross-entropy of the shifted labels (fp32) and the number of trained tokens.</summary>
    Tensor LossSum(LlmBatch batch)
    {
        using var scope = NewDisposeScope();
        var logits = batch.PositionIds is not null && batch.AttentionMask is not null
            ? Model.LogitsPacked(batch.InputIds, batch.PositionIds, batch.AttentionMask)
            : Model.Logits(batch.InputIds);
        long seq = logits.shape[1];
        var shifted = logits.narrow(1, 0, seq - 1).to_type(ScalarType.Float32).reshape(-1, logits.shape[2]);
        var labels = batch.Labels.narrow(1, 1, seq - 1).reshape(-1);
        return nn.functional.cross_entropy(shifted, labels, ignore_index: LlmSample.IgnoreIndex, reduction: nn.Reduction.Sum).MoveToOuterDisposeScope();
    }

    /// <summary>Mean loss per trained token over the eval set (NaN when there is none).</summary>
    public double Evaluate()
    {
        if (_evalRows.Count == 0) return double.NaN;
        bool wasTraining = Model.training;
        Model.eval();
        try
        {
            using var noGrad = torch.no_grad();
            double sum = 0; long tokens = 0;
            for (int i = 0; i < _evalRows.Count; i += Config.MicroBatchSize)
            {
                using var scope = NewDisposeScope();
                using var batch = LlmData.Collate(_evalRows.Skip(i).Take(Config.MicroBatchSize).ToList(), _padId, Config.SamplePacking, _device);
                sum += LossSum(batch).item<float>();
                tokens += batch.TrainedTokens;
            }
            return tokens == 0 ? double.NaN : sum / tokens;
        }
        finally { if (wasTraining) Model.train(); }
    }

    /// <summary>
    /// Trains to <see cref="TotalSteps"/> (or <see cref="LlmTrainerOptions.StopAfterSteps"/> more steps). With
    /// <paramref name="resumeFrom"/> (a checkpoint folder, or "latest" for the newest under output_dir) the run continues
    /// exactly where that checkpoint was written. Writes checkpoints every save_steps and the final adapter (PEFT layout)
    /// or model to output_dir.
    /// </summary>
    public LlmTrainResult Train(string? resumeFrom = null, CancellationToken cancel = default)
    {
        var c = Config;
        Directory.CreateDirectory(OutputDir);
        if (resumeFrom is not null) LoadCheckpoint(resumeFrom == "latest" ? LatestCheckpoint(OutputDir) : resumeFrom);
        else torch.manual_seed(c.Seed + 1); // dropout stream, independent of how many draws adapter init took

        Model.train();
        var clock = Stopwatch.StartNew();
        long startStep = _step, tokensSeen = 0;
        long stopAt = Math.Min(TotalSteps, _o.Options.StopAfterSteps is long k ? _step + k : TotalSteps);
        double lastLoss = double.NaN; double? lastEval = null;
        var trainParams = _trainable.Select(t => t.Param).ToList();
        while (_step < stopAt)
        {
            cancel.ThrowIfCancellationRequested();
            _optimizer.LearningRate = LearningRateAt(_step);
            var micro = MicroBatchesOf(_step);
            int stepTokens = micro.Sum(m => m.Sum(r => r.TrainedTokens));
            double lossSum = 0;
            foreach (var rows in micro)
            {
                using var scope = NewDisposeScope();
                using var batch = LlmData.Collate(rows, _padId, c.SamplePacking, _device);
                var loss = LossSum(batch);
                if (stepTokens > 0) loss.div(stepTokens).backward();
                lossSum += loss.item<float>();
                tokensSeen += batch.Tokens;
            }
            double gradNorm = GradientClipping.ClipByGlobalNorm(trainParams, c.MaxGradNorm);
            _optimizer.Step();
            _optimizer.ZeroGrad();
            Host?.InvalidateCache(AdapterName);
            _step++;
            lastLoss = stepTokens > 0 ? lossSum / stepTokens : double.NaN;
            _lossHistory.Add((_step, lastLoss));
            double? evalLoss = null;
            if (c.EvalSteps is long es && _evalRows.Count > 0 && (_step % es == 0 || _step == TotalSteps))
            {
                evalLoss = Evaluate();
                _evalHistory.Add((_step, evalLoss.Value));
                lastEval = evalLoss;
            }
            if (c.SaveSteps is long ss && _step % ss == 0) SaveCheckpoint();
            if (_o.Options.CollectEvery > 0 && _step % _o.Options.CollectEvery == 0)
            {
                GC.Collect();
                GC.WaitForPendingFinalizers();
            }
            var elapsed = clock.Elapsed;
            double perStep = elapsed.TotalSeconds / (_step - startStep);
            Progress?.Invoke(new LlmTrainProgress(_step, TotalSteps, lastLoss, _optimizer.LearningRate, tokensSeen / Math.Max(1e-9, elapsed.TotalSeconds),
                elapsed, TimeSpan.FromSeconds(perStep * (TotalSteps - _step)), evalLoss, gradNorm));
        }

        if (_step >= TotalSteps)
        {
            if (_evalRows.Count > 0 && (_evalHistory.Count == 0 || _evalHistory[^1].Item1 != _step))
            {
                lastEval = Evaluate();
                _evalHistory.Add((_step, lastEval.Value));
            }
            SaveFinal(OutputDir);
        }
        if (_o.Options.WritePlot && _lossHistory.Count > 0)
            Diffusion.LossCurve.Save(Path.Combine(OutputDir, "loss.png"), _lossHistory, "Training loss", _evalHistory, "optimizer step", "cross-entropy per token");
        return new LlmTrainResult(_step, lastLoss, lastEval, OutputDir, [.. _lossHistory], [.. _evalHistory]);
    }

    /// <summary>Writes the trained result: the adapter in PEFT layout (lora/qlora) or the full model (HF layout) to <paramref name="folder"/>.</summary>
    public void SaveFinal(string folder)
    {
        Directory.CreateDirectory(folder);
        if (Host is not null)
        {
            using var weights = Host[AdapterName].Export();
            PeftAdapterWriter.WritePeftFolder(folder, weights, new PeftWriteOptions
            {
                BaseModelNameOrPath = Config.BaseModel, TaskType = "CAUSAL_LM",
            });
            PatchPeftConfig(folder);
            WriteTrainingInfo(folder);
        }
        else
        {
            LlamaCheckpoint.SaveWeights(Model, Path.Combine(folder, "model.safetensors"), ScalarType.Float32);
            var src = Config.Resolve(Config.BaseModel);
            foreach (var f in new[] { "config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json" })
                if (File.Exists(Path.Combine(src, f)) && Path.GetFullPath(src) != Path.GetFullPath(folder))
                    File.Copy(Path.Combine(src, f), Path.Combine(folder, f), overwrite: true);
        }
    }

    /// <summary>Name of the file next to a trained adapter that records how it was trained (read by merge-adapter).</summary>
    public const string TrainingInfoName = "lorasharp_training.json";

    void WriteTrainingInfo(string folder)
    {
        var info = new JsonObject
        {
            ["adapter"] = Config.Adapter, ["base_model"] = Config.BaseModel, ["base_quantization"] = Config.IsQLora ? "nf4-double-quant-64-256" : null,
            ["bf16"] = Config.Bf16, ["steps"] = _step, ["optimizer"] = Config.Optimizer,
        };
        AtomicFile.WriteAllText(Path.Combine(folder, TrainingInfoName), info.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>True when an adapter folder's training info says the base was NF4 (QLoRA).</summary>
    public static bool WasTrainedOnNf4(string adapterPath)
    {
        var path = Path.Combine(Directory.Exists(adapterPath) ? adapterPath : Path.GetDirectoryName(Path.GetFullPath(adapterPath))!, TrainingInfoName);
        if (!File.Exists(path)) return false;
        try { return JsonNode.Parse(File.ReadAllText(path))?["base_quantization"] is JsonValue v && v.TryGetValue<string>(out var s) && s.StartsWith("nf4", StringComparison.Ordinal); }
        catch (JsonException) { return false; }
    }

    /// <summary>Fills the PEFT config fields the weights do not show (dropout, target list as configured).</summary>
    void PatchPeftConfig(string folder)
    {
        var path = Path.Combine(folder, AdapterFile.PeftConfigName);
        var json = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        json["lora_dropout"] = Config.LoraDropout;
        json["use_rslora"] = Config.UseRslora;
        json["use_dora"] = Config.UseDora;
        var sorted = new JsonObject();
        foreach (var kv in json.OrderBy(k => k.Key, StringComparer.Ordinal)) sorted[kv.Key] = kv.Value?.DeepClone();
        AtomicFile.WriteAllText(path, sorted.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    // ----------------------------------------------------------------------------------------- checkpoints

    /// <summary>The newest <c>checkpoint-N</c> folder under <paramref name="outputDir"/>.</summary>
    public static string LatestCheckpoint(string outputDir)
    {
        var best = Directory.Exists(outputDir)
            ? Directory.GetDirectories(outputDir, "checkpoint-*")
                .Select(d => (d, n: long.TryParse(Path.GetFileName(d)["checkpoint-".Length..], out var n) ? n : -1))
                .Where(t => t.n >= 0).OrderByDescending(t => t.n).FirstOrDefault()
            : default;
        return best.d ?? throw new LoraSharpException("no checkpoint-N folder to resume from", outputDir);
    }

    /// <summary>
    /// Writes <c>checkpoint-{step}</c> under output_dir atomically (a temporary folder renamed when complete):
    /// trainable parameters (exact), optimizer state, trainer state (step, data position, scheduler step, RNG state,
    /// loss history) and the adapter in PEFT layout.
    /// </summary>
    public string SaveCheckpoint()
    {
        var final = Path.Combine(OutputDir, $"checkpoint-{_step}");
        var tmp = Path.Combine(OutputDir, $".checkpoint-{_step}.tmp-{Environment.ProcessId}");
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        SafetensorsWriter.Write(Path.Combine(tmp, "trainable.safetensors"), _trainable.Select(t => new KeyValuePair<string, Tensor>(t.Name, t.Param)));
        SafetensorsWriter.Write(Path.Combine(tmp, "optimizer.safetensors"), _optimizer.State());
        byte[] rng;
        using (var state = torch.random.get_rng_state()) rng = state.bytes.ToArray();
        long epoch = _step / StepsPerEpoch;
        var trainerState = new JsonObject
        {
            ["global_step"] = _step,
            ["epoch"] = epoch,
            ["step_in_epoch"] = _step % StepsPerEpoch,
            ["micro_batch_position"] = (_step % StepsPerEpoch) * Config.GradientAccumulationSteps,
            ["scheduler_step"] = _step,
            ["learning_rate"] = LearningRateAt(_step),
            ["total_steps"] = TotalSteps,
            ["seed"] = Config.Seed,
            ["rng_state"] = Convert.ToBase64String(rng),
            ["loss_history"] = new JsonArray(_lossHistory.Select(h => (JsonNode)new JsonArray(h.Item1, h.Item2)).ToArray()),
            ["eval_history"] = new JsonArray(_evalHistory.Select(h => (JsonNode)new JsonArray(h.Item1, h.Item2)).ToArray()),
        };
        File.WriteAllText(Path.Combine(tmp, "trainer_state.json"), trainerState.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        if (Host is not null)
        {
            using var weights = Host[AdapterName].Export();
            PeftAdapterWriter.WritePeftFolder(tmp, weights, new PeftWriteOptions { BaseModelNameOrPath = Config.BaseModel, TaskType = "CAUSAL_LM" });
        }
        if (Directory.Exists(final)) Directory.Delete(final, true);
        Directory.Move(tmp, final);
        return final;
    }

    /// <summary>Restores a checkpoint written by <see cref="SaveCheckpoint"/> (same config required).</summary>
    public void LoadCheckpoint(string folder)
    {
        var statePath = Path.Combine(folder, "trainer_state.json");
        if (!File.Exists(statePath)) throw new LoraSharpException("not a checkpoint folder (no trainer_state.json)", folder);
        var state = JsonNode.Parse(File.ReadAllText(statePath))!.AsObject();
        if ((long)state["total_steps"]! != TotalSteps)
            throw new LoraSharpException($"checkpoint was written for {state["total_steps"]} total steps, this config gives {TotalSteps}", statePath, "total_steps");
        using (var file = SafetensorsFile.Open(Path.Combine(folder, "trainable.safetensors")))
        using (torch.no_grad())
            foreach (var (name, p) in _trainable)
            {
                if (!file.Contains(name)) throw new LoraSharpException("checkpoint lacks a trainable parameter of this config", file.FilePath, name);
                using var t = file.Load(name, p.dtype, p.device);
                p.copy_(t);
            }
        using (var file = SafetensorsFile.Open(Path.Combine(folder, "optimizer.safetensors")))
        {
            var tensors = file.Keys.ToDictionary(k => k, k => file.Load(k));
            try { _optimizer.LoadState(tensors); }
            finally { foreach (var t in tensors.Values) t.Dispose(); }
        }
        _step = (long)state["global_step"]!;
        _lossHistory.Clear();
        foreach (var h in state["loss_history"]!.AsArray()) _lossHistory.Add(((long)h![0]!, (double)h[1]!));
        _evalHistory.Clear();
        foreach (var h in state["eval_history"]!.AsArray()) _evalHistory.Add(((long)h![0]!, (double)h[1]!));
        var rng = Convert.FromBase64String((string)state["rng_state"]!);
        using var rngT = torch.tensor(rng, dtype: ScalarType.Byte);
        torch.random.set_rng_state(rngT);
        Host?.InvalidateCache(AdapterName);
    }

    public void Dispose()
    {
        _optimizer.Dispose();
        Host?.Dispose();
        Base.Dispose();
    }
}
